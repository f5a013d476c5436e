import torch

# The test models are tiny (d_model 32): on a shared 2-core machine, intra-op threads only add
# synchronisation cost (measured: a 32-wide linear 7 ms with 2 busy threads, < 0.5 ms with 1).
torch.set_num_threads(1)
