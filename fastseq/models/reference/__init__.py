"""torch.nn twins of fastseq.models: the same architectures written from torch.nn modules and
torch.nn.functional only, with the same state_dict keys; the oracles of the models' tests and
the peers of their benchmarks."""
