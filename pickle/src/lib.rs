//! PyTorch pickle files read as `torch.load(weights_only=True)` reads them (work in progress).
