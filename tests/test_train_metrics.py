"""The MFU denominator: the measured matmul peak."""
import torch

from dsv32.model import layers
from dsv32.train import metrics


def test_matmul_peak_is_the_faster_of_the_two_kernels(monkeypatch):
    """MFU is measured against the faster of `a @ b` and the model's `matmul_nt` (oneDNN for fp32 on CPU)."""
    used = []

    def counted(x, weight, bias=None):
        used.append(x.shape)
        return torch.nn.functional.linear(x, weight, bias)

    monkeypatch.setattr(metrics, "matmul_nt", counted)
    rates = iter([2e9, 5e9])
    monkeypatch.setattr(metrics, "_flops_per_second", lambda matmul, size, seconds, device: (matmul(), next(rates))[1])
    assert metrics.measure_matmul_peak(torch.float32, size=64, cached=False) == 5e9
    assert used == [(64, 64)]


def test_matmul_peak_measures_a_positive_rate():
    assert metrics.measure_matmul_peak(torch.float32, size=128, seconds=0.02, cached=False) > 1e8
    assert layers.matmul_nt(torch.eye(3), torch.arange(9.0).view(3, 3)).equal(torch.arange(9.0).view(3, 3).t())
