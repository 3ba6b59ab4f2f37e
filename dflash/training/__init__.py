"""Training: the tiny target's pretraining, and drafter training (DFlash, Orthrus) in one-job modules."""
