"""The engine room: the shared region, the fused update, flat parameter buffers, the extension
loader and checkpoint files. Nothing here knows about training methods or BLEU."""
