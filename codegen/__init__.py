"""kvpass.codegen: Triton kernels for the schemes, their torch.library registration and the Inductor
lowering. Installed as ``kvpass.codegen``; every kernel has a PyTorch reference in kvpass.methods."""
