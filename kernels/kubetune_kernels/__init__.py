"""Optional fused GPU kernels for the trainer.

Every kernel here has a pure-torch reference that the trainer uses when the kernel cannot run
(no GPU, unsupported architecture), and a test that compares the two. The package is empty until
the first kernel lands; importing it is always safe and pulls in nothing.
"""
