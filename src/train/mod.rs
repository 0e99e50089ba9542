//! End-to-end training: data sets and augmentations, the SimCLR / MoCo v2 / SupCon loops and
//! their evaluation (kNN and linear probe).
