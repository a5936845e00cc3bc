"""MTP speculative decoding: lossless verification, the policy that picks K, and whole-step CUDA graphs."""
