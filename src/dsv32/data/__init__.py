"""Data: corpora, verifiable task generators, token shards and the packing loader.

    from dsv32.data import stdlib_documents, prepare, PackedLoader
    prepare(["stdlib"], "runs/tok", "runs/data")                   # shards + manifest.json
    loader = PackedLoader("runs/data", "train", seq_len=256, batch_size=8, rank=0, world_size=1)
    batch = next(loader)                                            # input_ids, labels, doc_starts, position_ids
    state = loader.state_dict()                                     # resume exactly with load_state_dict
"""
from dsv32.data.corpus import Document, corpus_documents, stdlib_documents, user_documents
from dsv32.data.loader import IGNORE_INDEX, PackedLoader
from dsv32.data.prepare import prepare
from dsv32.data.shards import read_manifest

__all__ = [
    "IGNORE_INDEX", "Document", "PackedLoader", "corpus_documents", "prepare", "read_manifest",
    "stdlib_documents", "user_documents",
]
