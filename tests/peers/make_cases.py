"""Peer-compatibility cases: each peer library's documented formula, written out in PyTorch
float64 (autograd for the gradients), on fresh inputs. One case folder per option of contra that
reproduces that library's number; the folders use the fixture format (tests/fixtures/README.md)
and `tests/peers.rs` runs them on every backend.

    python3 tests/peers/make_cases.py        # rewrites tests/peers/<case>/

Formulas (transcribed from the libraries' documentation and source, not imported):
- supcon_pml: pytorch-metric-learning 2.x SupConLoss (cosine similarity, AvgNonZeroReducer):
  per anchor -mean_{p in P(a)} log softmax_{j != a}(s_aj / t)_p; the mean over the anchors whose
  loss is non-zero (those with a positive); 0 for a batch without positive or negative pairs.
"""
import json
import os

import numpy as np
import torch

torch.set_default_dtype(torch.float64)
HERE = os.path.dirname(os.path.abspath(__file__))


def save(name, kind, options, arrays):
    """Writes one case folder. `options.default_differs` says whether contra's default options
    give another number on it (tests/peers.rs checks that they do)."""
    folder = os.path.join(HERE, name)
    os.makedirs(folder, exist_ok=True)
    files = {}
    for key, value in arrays.items():
        value = value.detach().numpy() if torch.is_tensor(value) else np.asarray(value)
        np.save(os.path.join(folder, key + ".npy"), value)
        files[key] = key + ".npy"
    with open(os.path.join(folder, "case.json"), "w") as f:
        json.dump({"kind": kind, "options": options, "arrays": files}, f, indent=2, sort_keys=True)
        f.write("\n")


def pml_supcon(features, labels, temperature):
    """PML SupConLoss on the N*V rows (view-major within a sample: row n*V + v)."""
    n, v, d = features.shape
    z = torch.nn.functional.normalize(features.reshape(n * v, d), dim=1)
    rows = torch.repeat_interleave(labels, v)
    same = rows[:, None] == rows[None, :]
    eye = torch.eye(n * v, dtype=torch.bool)
    pos, neg = same & ~eye, ~same
    if not (pos.any() and neg.any()):
        return (z * 0).sum()
    logits = z @ z.T / temperature
    keep = pos | neg
    denom = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - denom
    tiny = torch.finfo(torch.float64).tiny
    per_anchor = -(log_prob * pos).sum(1) / (pos.sum(1) + tiny)
    nonzero = per_anchor > 0
    return per_anchor[nonzero].mean() if nonzero.any() else (z * 0).sum()


def supcon_cases(gen):
    for name, labels, views, differs in [
        # One view: the singletons have no positive and are left out of the mean.
        ("supcon_pml_singletons", [0, 1, 2, 2, 3, 4, 4], 1, True),
        # Two classes, two views: every anchor has positives (the reductions agree).
        ("supcon_pml_two_classes", [0, 1, 0, 1, 1], 2, False),
        # One class: no negative pair, PML's loss is 0 (SupContrast's is not).
        ("supcon_pml_one_class", [5, 5, 5, 5], 2, True),
    ]:
        labels = torch.tensor(labels)
        features = torch.randn(len(labels), views, 7, generator=gen, requires_grad=True)
        loss = pml_supcon(features, labels, 0.1)
        (grad,) = torch.autograd.grad(loss, features, allow_unused=False)
        save(name, "supcon",
             {"temperature": 0.1, "reduction": "anchors_with_positives",
              "peer": "pytorch-metric-learning SupConLoss (AvgNonZeroReducer)",
              "default_differs": differs},
             {"features": features, "labels": labels.to(torch.int64), "loss": loss,
              "grad_features": grad})


def main():
    gen = torch.Generator().manual_seed(15)
    supcon_cases(gen)


if __name__ == "__main__":
    main()
