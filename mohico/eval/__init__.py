"""Evaluation of a backbone (floor 3, above models, below the trainer): frozen-feature protocols
(kNN, retrieval, linear probe), their report, and fine-tuning's module and test."""
