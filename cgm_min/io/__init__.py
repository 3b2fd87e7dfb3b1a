"""Checkpoints on disk: sharded safetensors read and written one tensor at a time, and the streaming merge.

    reader.py             Checkpoint: a lazy per-tensor reader over one .safetensors file or an index-sharded
                          folder (own header parser, os.preadv into reused buffers, every header checked)
    writer.py             ShardWriter: header first, then tensor bytes in order; index files; SHA-256
    outdir.py             AtomicOutputDir: files appear in OUT_DIR all at once or not at all (kill -9 included)
    layouts.py            both LLaVA / Qwen2.5-VL key layouts mapped to in-memory names; merge-set presets
    chunked.py            CGM and linear merges in cache-sized slices, bit-identical to the registry
    streaming.py          one output shard: blocks read ahead and written behind on an IO thread
    merge_config.py       the YAML config of `cgm-merge`, checked field by field
    merge_checkpoints.py  the Python API of `cgm-merge`: plan, streaming merge, verification, record
    curvature_files.py    curvature written in the model's own shard layout (`cgm-merge curvature`)

Nothing here imports transformers at module level (importing the model classes costs seconds): only the
verification step does, for the one class it loads.
"""
from .outdir import AtomicOutputDir
from .reader import Checkpoint, SafetensorsFile, TensorInfo
from .writer import ShardWriter, build_header, index_json, write_tensors

__all__ = ["Checkpoint", "SafetensorsFile", "TensorInfo", "ShardWriter", "build_header", "index_json",
           "write_tensors", "AtomicOutputDir"]
