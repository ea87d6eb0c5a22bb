"""Running the model on one device: items in, waveforms out, for any jobs in one call.

The engine (loads once, samples items), the eager Euler sampler and the fast path (bucketed CUDA
graphs, fused Triton kernels beside their torch references, attention), the kernel switching done
while the GPU is idle, the batcher that groups concurrent jobs' items, the device choice and the
Whisper transcriber. Imports ``model`` below it, never ``jobs``; no re-exports here (torch).
"""
