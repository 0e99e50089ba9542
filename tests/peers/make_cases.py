"""Peer-compatibility cases: each peer library's documented formula, written out in PyTorch
float64 (autograd for the gradients), on fresh inputs. One case folder per option of contra that
reproduces that library's number; the folders use the fixture format (tests/fixtures/README.md)
and `tests/peers.rs` runs them on every backend.

    python3 tests/peers/make_cases.py        # rewrites tests/peers/<case>/

Formulas (transcribed from the libraries' documentation and source, not imported):
- supcon_pml: pytorch-metric-learning 2.x SupConLoss (cosine similarity, AvgNonZeroReducer):
  per anchor -mean_{p in P(a)} log softmax_{j != a}(s_aj / t)_p; the mean over the anchors whose
  loss is non-zero (those with a positive); 0 for a batch without positive or negative pairs.
- triplet_pml_batch_hard: PML TripletMarginLoss(margin) on BatchHardMiner's triplets (per anchor
  the farthest positive and the nearest negative), AvgNonZeroReducer: the mean of the positive
  relu(d_ap - d_an + m). Distances: LpDistance(normalize_embeddings=False), i.e. euclidean.
- triplet_pml_semi_hard: PML TripletMarginLoss on TripletMarginMiner(margin, "semihard")'s
  triplets, 0 < d_an - d_ap <= m, AvgNonZeroReducer.
- margin_pml_contrastive: PML ContrastiveLoss(pos_margin=0, neg_margin=m) over given pairs
  (LpDistance without normalization): AvgNonZero of the similar pairs' d plus AvgNonZero of the
  dissimilar pairs' relu(m - d).
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


def euclidean(x):
    sq = (x * x).sum(1)
    return torch.sqrt(torch.clamp(sq[:, None] + sq[None, :] - 2 * x @ x.T, min=1e-12))


def avg_nonzero(terms):
    nonzero = terms > 0
    return terms[nonzero].mean() if nonzero.any() else terms.sum() * 0


def pml_triplet(x, labels, margin, miner):
    d = euclidean(x)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    pos, neg = same & ~eye, ~same
    if miner == "batch_hard":
        terms = []
        for a in range(len(labels)):
            if pos[a].any() and neg[a].any():
                terms.append(torch.relu(d[a][pos[a]].max() - d[a][neg[a]].min() + margin))
        terms = torch.stack(terms) if terms else (x * 0).sum().reshape(1)
    else:
        a, p, q = torch.nonzero(pos[:, :, None] & neg[:, None, :], as_tuple=True)
        gap = d[a, q] - d[a, p]
        keep = (gap > 0) & (gap <= margin)
        terms = torch.relu(d[a, p] - d[a, q] + margin)[keep]
    return avg_nonzero(terms)


def triplet_cases(gen):
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0, 1])
    for miner, mining, margin in [("batch_hard", "batch_hard", 0.8),
                                  ("semi_hard", "semi_hard_all", 0.6)]:
        # Spread so that some anchors' hardest triplets are inactive and some semi-hard ones.
        x = (torch.randn(len(labels), 5, generator=gen) * 0.6).requires_grad_(True)
        loss = pml_triplet(x, labels, margin, miner)
        (grad,) = torch.autograd.grad(loss, x)
        options = {"distance": "euclidean", "mining": mining, "margin": margin,
                   "reduction": "nonzero", "default_differs": miner == "batch_hard",
                   "peer": f"pytorch-metric-learning TripletMarginLoss, {miner} triplets, "
                           "AvgNonZeroReducer"}
        save(f"triplet_pml_{miner}", "triplet", options,
             {"x": x, "labels": labels.to(torch.int64), "loss": loss, "grad_x": grad})


def margin_cases(gen):
    y = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0])
    x1 = torch.randn(len(y), 6, generator=gen, requires_grad=True)
    x2 = (x1.detach() + torch.randn(len(y), 6, generator=gen) * 0.7).requires_grad_(True)
    margin = 1.7
    d = torch.sqrt(((x1 - x2) ** 2).sum(1))
    loss = avg_nonzero(d[y == 0]) + avg_nonzero(torch.relu(margin - d[y == 1]))
    g1, g2 = torch.autograd.grad(loss, (x1, x2))
    save("margin_pml_contrastive", "margin",
         {"margin": margin, "variant": "pml_contrastive", "default_differs": True,
          "peer": "pytorch-metric-learning ContrastiveLoss (AvgNonZeroReducer per group)"},
         {"x1": x1, "x2": x2, "y": y.to(torch.int64), "loss": loss, "grad_x1": g1, "grad_x2": g2})


def main():
    gen = torch.Generator().manual_seed(15)
    supcon_cases(gen)
    triplet_cases(gen)
    margin_cases(gen)


if __name__ == "__main__":
    main()
