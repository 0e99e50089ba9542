//! A minimal encoder for the trainer: linear layers, ReLU, BatchNorm1d, MLPs and projection
//! heads with hand-written backward passes, plus optimizers and learning-rate schedules.
