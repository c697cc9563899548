"""The paper's experiment configs: IEMOCAP, CIFAR-100 and AG News, one file each."""
