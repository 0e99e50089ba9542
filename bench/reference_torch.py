#!/usr/bin/env python3
"""PyTorch reference timings for contra's benchmark suite (`contra bench`).

Times PyTorch eager (and, with --compile, torch.compile) on the same ops, shapes and inputs as
contra's suite, on the CPU or a CUDA GPU, and writes JSON. `contra bench` runs this script itself
(with the interpreter named by CONTRA_TORCH_PYTHON, default python3) and passes it the case list;
it can also run on its own:

    python3 bench/reference_torch.py --quick --json torch.json
    python3 bench/reference_torch.py --cases cases.json --device cuda --compile --json out.json
    python3 bench/reference_torch.py --list quick        # the case ids, no torch needed

Method (the same as contra's side): inputs are the suite's counter-based hash (splitmix64 of
seed * 2^32 + index, mapped to [-1, 1)), so every implementation sees the same tensors and the
losses can be compared; each case runs once to warm up, once to read the peak memory (CPU: the
resident high-water mark after the call minus the resident size before it, with the mark reset
through /proc/self/clear_refs and free heap returned with malloc_trim; GPU:
torch.cuda.max_memory_allocated minus the allocation before the call), then is timed until both
a minimum count and a minimum time are reached (CPU: perf_counter; GPU: CUDA events), rotating
through 3 input sets. The reported time is the median.

Peers: when pytorch-metric-learning (`pip install pytorch-metric-learning`) or open_clip
(`pip install open_clip_torch`; only its `loss.py` is loaded, so `--no-deps` is enough) is
installed, their own classes join as extra rows on the same inputs: `pml` (NTXentLoss,
SupConLoss, TripletMarginLoss with BatchHardMiner) and `open_clip` (ClipLoss, SigLipLoss).
`--no-peers` leaves them out.

Exit status: 0 on success, 3 when torch cannot be imported (a clear message on stderr, and a JSON
{"error": "torch-missing"} when --json is given), 2 on bad arguments.
"""

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import time

EXIT_NO_TORCH = 3

# The suite's hyper-parameters (src/bench/cases.rs).
NTXENT_TAU = 0.1
INFONCE_TAU = 0.1
MOCO_TAU = 0.2
SUPCON_TAU = (0.1, 0.07)
CLIP_LOG_SCALE = math.log(1.0 / 0.07)
SIGLIP_LOG_SCALE = math.log(10.0)
SIGLIP_BIAS = -10.0
TRIPLET_MARGIN = 0.2
MARGIN_MARGIN = 1.0
MOMENTUM_M = 0.999


# ---------------------------------------------------------------------------------------------
# Cases (mirrors src/bench/cases.rs; `contra bench` passes its own list with --cases)


def case(op, pass_, n, d=0, k=0, v=0, c=0, dtype="f32", mining="batch-hard"):
    return {"op": op, "pass": pass_, "n": n, "d": d, "k": k, "v": v, "c": c, "dtype": dtype,
            "mining": mining}


def mining(cs):
    return cs.get("mining", "batch-hard")


def shape_label(cs):
    dims = dims_label(cs)
    dtype = cs.get("dtype", "f32")
    return dims if dtype == "f32" else f"{dims} {dtype}"


def dims_label(cs):
    n, d, k, v, c = cs["n"], cs["d"], cs["k"], cs["v"], cs["c"]
    op = cs["op"]
    if op in ("ntxent", "clip", "siglip", "margin", "normalize"):
        return f"N={n} D={d}"
    if op in ("infonce", "similarity"):
        return f"N={n} M={k} D={d}"
    if op == "moco":
        return f"N={n} K={k} D={d}"
    if op == "supcon":
        return f"N={n} V={v} D={d} C={c}"
    if op == "triplet":
        # Batch-hard, the first triplet case, keeps its id without a suffix.
        suffix = "" if mining(cs) == "batch-hard" else f" {mining(cs)}"
        return f"N={n} D={d} C={c}{suffix}"
    if op == "nce":
        return f"B={n} k={k}"
    if op == "momentum":
        return f"P={n}"
    raise ValueError(f"unknown op {op}")


def case_id(cs):
    return f"{cs['op']} {cs['pass']} {shape_label(cs)}"


def both(make):
    return [make("fwd"), make("fwd+bwd")]


def quick_cases():
    cases = []
    for n in (1024, 4096):
        cases += both(lambda p: case("ntxent", p, n, 128))
    cases.append(case("clip", "fwd+bwd", 1024, 128))
    cases.append(case("siglip", "fwd+bwd", 4096, 128))
    cases.append(case("moco", "fwd+bwd", 256, 128, k=4096))
    cases.append(case("supcon", "fwd+bwd", 512, 128, v=2, c=10))
    cases.append(case("triplet", "fwd+bwd", 1024, 128, c=16))
    for m in ("batch-all", "semi-hard", "semi-hard-all"):
        cases.append(case("triplet", "fwd+bwd", 256, 128, c=16, mining=m))
    cases.append(case("margin", "fwd+bwd", 16384, 128))
    cases.append(case("nce", "fwd+bwd", 1024, k=4096))
    return cases


def full_cases():
    cases = []
    for d in (128, 512):
        for n in (1024, 4096, 16384):
            cases += both(lambda p: case("ntxent", p, n, d))
    cases += both(lambda p: case("infonce", p, 4096, 128, k=4096))
    cases += both(lambda p: case("clip", p, 4096, 512))
    for n in (4096, 16384):
        cases += both(lambda p: case("siglip", p, n, 128))
    cases += both(lambda p: case("moco", p, 256, 128, k=65536))
    cases += both(lambda p: case("supcon", p, 2048, 128, v=2, c=100))
    for n in (256, 1024, 4096):
        cases += both(lambda p: case("triplet", p, n, 128, c=min(64, n // 4)))
    for m in ("batch-all", "semi-hard", "semi-hard-all"):
        for n in (256, 512):
            cases += both(lambda p: case("triplet", p, n, 128, c=16, mining=m))
    cases += both(lambda p: case("margin", p, 65536, 128))
    cases += both(lambda p: case("nce", p, 4096, k=4096))
    cases += both(lambda p: case("normalize", p, 65536, 128))
    cases.append(case("similarity", "fwd", 4096, 128, k=4096))
    cases.append(case("momentum", "fwd", 25_000_000))
    return cases


def input_bytes(cs):
    n, d, k, v = cs["n"], cs["d"], cs["k"], cs["v"]
    op = cs["op"]
    if op in ("ntxent", "triplet"):
        elems = n * d
    elif op == "normalize":
        elems = n * d * (2 if cs["pass"] == "fwd+bwd" else 1)
    elif op in ("infonce", "similarity"):
        elems = (n + k) * d
    elif op in ("clip", "siglip", "margin"):
        elems = 2 * n * d
    elif op == "moco":
        elems = (2 * n + k) * d
    elif op == "supcon":
        elems = n * v * d
    elif op == "nce":
        elems = 2 * n * (k + 1)
    else:
        elems = 2 * n
    return 4 * elems


def rotations(cs):
    return cs.get("rotations") or (1 if input_bytes(cs) > (64 << 20) else 3)


# ---------------------------------------------------------------------------------------------
# Inputs: the suite's counter-based hash, bit-exact with src/bench/cases.rs::uniform


def _signed(x):
    return x - (1 << 64) if x >= (1 << 63) else x


GOLDEN = _signed(0x9E3779B97F4A7C15)
MIX1 = _signed(0xBF58476D1CE4E5B9)
MIX2 = _signed(0x94D049BB133111EB)


def _lsr(torch, z, s):
    """Logical shift right of int64 lanes (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def uniform(torch, length, seed):
    """`length` float32 values in [-1, 1): (splitmix64(seed * 2^32 + i) >> 40) / 2^23 - 1.
    int64 arithmetic wraps modulo 2^64, as splitmix64 needs."""
    out = torch.empty(length, dtype=torch.float32)
    chunk = 1 << 22
    for start in range(0, length, chunk):
        stop = min(length, start + chunk)
        z = torch.arange(start, stop, dtype=torch.int64) + (seed << 32)
        z = z + GOLDEN
        z = (z ^ _lsr(torch, z, 30)) * MIX1
        z = (z ^ _lsr(torch, z, 27)) * MIX2
        z = z ^ _lsr(torch, z, 31)
        out[start:stop] = _lsr(torch, z, 40).to(torch.float32) / float(1 << 23) - 1.0
    return out


def seed(set_index, tensor):
    return 1 + 8 * set_index + tensor


def make_inputs(torch, cs, set_index, device):
    """The input tensors of one set, in the order of src/bench/runner.rs::raw_inputs."""
    n, d, k, v = cs["n"], cs["d"], cs["k"], cs["v"]
    op = cs["op"]

    # bf16 cases: the same values rounded to bf16, as contra uploads them (autocast-free: the
    # ops then run in bf16 with PyTorch's own tensor-core GEMMs on a GPU). tf32 cases keep f32
    # inputs; their GEMMs run with allow_tf32 (see tf32_matmuls).
    dtype = torch.bfloat16 if cs.get("dtype", "f32") == "bf16" else torch.float32

    def u(shape, t):
        size = 1
        for s in shape:
            size *= s
        return uniform(torch, size, seed(set_index, t)).reshape(shape).to(device=device, dtype=dtype)

    if op in ("ntxent", "triplet"):
        return [u((n, d), 0)]
    if op in ("infonce", "similarity"):
        return [u((n, d), 0), u((k, d), 1)]
    if op in ("clip", "siglip", "margin"):
        return [u((n, d), 0), u((n, d), 1)]
    if op == "moco":
        return [u((n, d), 0), u((n, d), 1), u((k, d), 2)]
    if op == "supcon":
        return [u((n, v, d), 0)]
    if op == "nce":
        ln_k = math.log(k)
        return [u((n,), 0), u((n, k), 1), 0.5 * u((n,), 2) - ln_k, 0.5 * u((n, k), 3) - ln_k]
    if op == "normalize":
        return [u((n, d), 0)] + ([u((n, d), 1)] if cs["pass"] == "fwd+bwd" else [])
    if op == "momentum":
        return [u((n,), 0), u((n,), 1)]
    raise ValueError(op)


# ---------------------------------------------------------------------------------------------
# The ops, as a PyTorch user writes them (eager: every step materializes its result)


def build_op(torch, cs, device):
    """Returns (loss_fn, grad_inputs, constants): loss_fn(*inputs) -> scalar (or output tensor);
    grad_inputs: indices of inputs that get a gradient in fwd+bwd."""
    F = torch.nn.functional
    n, c = cs["n"], cs["c"]
    op = cs["op"]

    if op == "ntxent":
        # Static pieces a training loop builds once.
        mask = torch.eye(n, dtype=torch.bool, device=device)
        targets = (torch.arange(n, device=device) + n // 2) % n

        def ntxent(z):
            zn = F.normalize(z, dim=1)
            logits = zn @ zn.T / NTXENT_TAU
            logits = logits.masked_fill(mask, float("-inf"))
            return F.cross_entropy(logits, targets)

        return ntxent, [0]

    if op == "infonce":
        targets = torch.arange(n, device=device)

        def infonce(q, k):
            logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / INFONCE_TAU
            return F.cross_entropy(logits, targets)

        return infonce, [0, 1]

    if op == "clip":
        targets = torch.arange(n, device=device)
        log_scale = torch.tensor(CLIP_LOG_SCALE, device=device, requires_grad=True)

        def clip(a, b):
            logits = log_scale.exp() * F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
            return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

        return clip, [0, 1]

    if op == "siglip":
        # open_clip's SigLipLoss (features normalized by the model, logit_scale passed as
        # exp(log_scale)), with its learnable scale and bias.
        log_scale = torch.tensor(SIGLIP_LOG_SCALE, device=device, requires_grad=True)
        bias = torch.tensor(SIGLIP_BIAS, device=device, requires_grad=True)

        def siglip(a, b):
            logits = log_scale.exp() * F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
            logits += bias
            labels = 2 * torch.eye(n, device=device, dtype=a.dtype) - torch.ones(n, n, device=device, dtype=a.dtype)
            return -F.logsigmoid(labels * logits).sum() / n

        return siglip, [0, 1]

    if op == "moco":
        labels = torch.zeros(n, dtype=torch.long, device=device)

        def moco(q, k, queue):
            qn = F.normalize(q, dim=1)
            kn = F.normalize(k, dim=1).detach()
            l_pos = torch.einsum("nc,nc->n", qn, kn).unsqueeze(-1)
            l_neg = qn @ queue.T
            logits = torch.cat([l_pos, l_neg], dim=1) / MOCO_TAU
            return F.cross_entropy(logits, labels)

        return moco, [0]

    if op == "supcon":
        labels = torch.arange(n, device=device) % c
        tau, base = SUPCON_TAU

        def supcon(features):
            # Khosla et al.'s SupConLoss (contrast_mode "all"), masks built per call as there.
            bsz, views = features.shape[0], features.shape[1]
            features = F.normalize(features, dim=2)
            lab = labels.view(-1, 1)
            mask = torch.eq(lab, lab.T).float()
            contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
            logits = contrast @ contrast.T / tau
            logits_max, _ = torch.max(logits, dim=1, keepdim=True)
            logits = logits - logits_max.detach()
            mask = mask.repeat(views, views)
            logits_mask = torch.scatter(
                torch.ones_like(mask), 1,
                torch.arange(bsz * views, device=device).view(-1, 1), 0)
            mask = mask * logits_mask
            exp_logits = torch.exp(logits) * logits_mask
            log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
            mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
            return (-(tau / base) * mean_log_prob_pos).mean()

        return supcon, [0]

    if op == "triplet":
        labels = torch.arange(n, device=device) % c
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        pos_mask = same & ~torch.eye(n, dtype=torch.bool, device=device)
        valid = pos_mask.any(1) & (~same).any(1)

        def distances(x):
            # From the Gram matrix, as the common PyTorch code does.
            dot = x @ x.T
            sq = torch.diagonal(dot)
            d2 = sq.unsqueeze(0) - 2.0 * dot + sq.unsqueeze(1)
            return torch.sqrt(torch.clamp(d2, min=1e-12))

        if mining(cs) in ("batch-all", "semi-hard-all"):
            # Every valid (a, p, n) as an N x N x N tensor (semi-hard-all: only those with
            # 0 < d_an - d_ap <= m); the mean of the positive terms.
            triplets = pos_mask.unsqueeze(2) & ~same.unsqueeze(1)
            semi_only = mining(cs) == "semi-hard-all"

            def triplet(x):
                dist = distances(x)
                gap = dist.unsqueeze(2) - dist.unsqueeze(1)
                mined = triplets & (gap < 0) & (gap + TRIPLET_MARGIN >= 0) if semi_only else triplets
                terms = F.relu(gap + TRIPLET_MARGIN) * mined
                return terms.sum() / (terms > 0).sum().clamp(min=1)

            return triplet, [0]
        if mining(cs) == "semi-hard":
            # TF-Addons' semi-hard: per positive pair the nearest negative farther than the
            # positive, else the farthest negative; N x N x N masks.
            negative = ~same

            def triplet(x):
                dist = distances(x)
                d_ap, d_an = dist.unsqueeze(2), dist.unsqueeze(1)
                farther = negative.unsqueeze(1) & (d_an > d_ap)
                inf = torch.tensor(float("inf"), device=device)
                nearest_farther = torch.where(farther, d_an, inf).min(dim=2).values
                farthest = torch.where(negative, dist, -inf).max(dim=1, keepdim=True).values
                chosen = torch.where(farther.any(2), nearest_farther, farthest)
                mined = pos_mask & negative.any(1, keepdim=True)
                return F.relu(dist - chosen + TRIPLET_MARGIN)[mined].mean()

            return triplet, [0]

        def triplet(x):
            # Batch-hard (Hermans et al.): masked max / min per anchor.
            dist = distances(x)
            hardest_pos = (dist * pos_mask).max(dim=1).values
            max_dist = dist.max(dim=1, keepdim=True).values
            hardest_neg = (dist + max_dist * same).min(dim=1).values
            return F.relu(hardest_pos - hardest_neg + TRIPLET_MARGIN)[valid].mean()

        return triplet, [0]

    if op == "margin":
        y = (torch.arange(n, device=device) % 2).float()

        def margin(x1, x2):
            d2 = ((x1 - x2) ** 2).sum(1)
            d = torch.sqrt(torch.clamp(d2, min=1e-12))
            return ((1 - y) * d.pow(2) / 2 + y * F.relu(MARGIN_MARGIN - d).pow(2) / 2).mean()

        return margin, [0, 1]

    if op == "nce":
        ln_k = math.log(cs["k"])

        def nce(s_pos, s_neg, logq_pos, logq_neg):
            dp = s_pos - ln_k - logq_pos
            dn = s_neg - ln_k - logq_neg
            return (F.softplus(-dp) + F.softplus(dn).sum(1)).mean()

        return nce, [0, 1]

    if op == "normalize":
        return (lambda x, *rest: F.normalize(x, dim=1)), [0]

    if op == "similarity":
        return (lambda a, b: F.normalize(a, dim=1) @ F.normalize(b, dim=1).T), []

    if op == "momentum":

        def momentum(theta_k, theta_q):
            theta_k.mul_(MOMENTUM_M).add_(theta_q, alpha=1 - MOMENTUM_M)
            return theta_k

        return momentum, []

    raise ValueError(op)


# ---------------------------------------------------------------------------------------------
# Peers: other libraries' own loss classes on the same inputs


def load_peer(name):
    """The peer library (its modules), or None when it is not installed here."""
    try:
        if name == "pml":
            import pytorch_metric_learning
            from pytorch_metric_learning import distances, losses, miners, reducers
            return {"version": pytorch_metric_learning.__version__, "distances": distances,
                    "losses": losses, "miners": miners, "reducers": reducers}
        if name == "open_clip":
            # Its loss module alone: importing the package would import its models (timm, ...).
            spec = importlib.util.find_spec("open_clip")
            if spec is None or not spec.submodule_search_locations:
                return None
            path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
            loss_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
            module = importlib.util.module_from_spec(loss_spec)
            loss_spec.loader.exec_module(module)
            try:
                from importlib.metadata import version
                found = version("open_clip_torch")
            except Exception:  # noqa: BLE001 - the version is only reported
                found = "?"
            return {"version": found, "loss": module}
    except Exception:  # noqa: BLE001 - not installed, or broken: no rows from it
        return None
    return None


PEER_NAMES = ("pml", "open_clip")


def peer_bytes_estimate(cs, name):
    """Like eager_bytes_estimate, for the peer's own formulation: PML's NTXentLoss compares each
    positive pair with every negative pair of its anchor in one (pairs x pairs) matrix, N^3."""
    if name == "pml" and cs["op"] == "ntxent":
        return 4 * 4 * cs["n"] ** 3 + 3 * input_bytes(cs)
    return eager_bytes_estimate(cs)


def build_peer_op(torch, cs, device, name, lib):
    """(loss_fn, grad_inputs) of the peer's own class for the case, or None when it has none.
    Each is set up to compute the suite's definition, so its loss agrees with contra's."""
    F = torch.nn.functional
    n, c, op = cs["n"], cs["c"], cs["op"]
    if name == "pml":
        if op == "ntxent":
            # One positive per row (its pair): PML's NT-Xent over positive pairs is the suite's.
            labels = torch.arange(n, device=device) % (n // 2)
            loss = lib["losses"].NTXentLoss(temperature=NTXENT_TAU)
            return (lambda z: loss(z, labels)), [0]
        if op == "supcon":
            tau, base = SUPCON_TAU
            labels = (torch.arange(n, device=device) % c).repeat(cs["v"])
            loss = lib["losses"].SupConLoss(temperature=tau)

            def supcon(features):
                views = torch.cat(torch.unbind(features, dim=1), dim=0)
                # PML's SupConLoss has no base temperature: Khosla et al.'s is it times tau / base.
                return loss(views, labels) * (tau / base)

            return supcon, [0]
        if op == "triplet" and mining(cs) == "batch-hard":
            labels = torch.arange(n, device=device) % c
            dist = lib["distances"].LpDistance(normalize_embeddings=False)
            miner = lib["miners"].BatchHardMiner(distance=dist)
            # MeanReducer: the mean over every mined triplet, the suite's batch-hard.
            loss = lib["losses"].TripletMarginLoss(
                margin=TRIPLET_MARGIN, distance=dist, reducer=lib["reducers"].MeanReducer())
            return (lambda x: loss(x, labels, miner(x, labels))), [0]
        if op == "triplet" and mining(cs) == "semi-hard-all":
            # PML's TripletMarginMiner("semihard"): 0 < d_an - d_ap <= m; AvgNonZeroReducer.
            labels = torch.arange(n, device=device) % c
            dist = lib["distances"].LpDistance(normalize_embeddings=False)
            miner = lib["miners"].TripletMarginMiner(
                margin=TRIPLET_MARGIN, type_of_triplets="semihard", distance=dist)
            loss = lib["losses"].TripletMarginLoss(margin=TRIPLET_MARGIN, distance=dist)
            return (lambda x: loss(x, labels, miner(x, labels))), [0]
        if op == "triplet" and mining(cs) == "batch-all":
            # No miner: every triplet; its default AvgNonZeroReducer: the mean of the positive
            # terms, the suite's batch-all.
            labels = torch.arange(n, device=device) % c
            dist = lib["distances"].LpDistance(normalize_embeddings=False)
            loss = lib["losses"].TripletMarginLoss(margin=TRIPLET_MARGIN, distance=dist)
            return (lambda x: loss(x, labels)), [0]
    if name == "open_clip":
        # open_clip's models normalize the features before the loss; the scale is exp(log_scale).
        if op == "clip":
            log_scale = torch.tensor(CLIP_LOG_SCALE, device=device, requires_grad=True)
            loss = lib["loss"].ClipLoss()
            return (lambda a, b: loss(F.normalize(a, dim=1), F.normalize(b, dim=1),
                                      log_scale.exp())), [0, 1]
        if op == "siglip":
            log_scale = torch.tensor(SIGLIP_LOG_SCALE, device=device, requires_grad=True)
            bias = torch.tensor(SIGLIP_BIAS, device=device, requires_grad=True)
            loss = lib["loss"].SigLipLoss()
            return (lambda a, b: loss(F.normalize(a, dim=1), F.normalize(b, dim=1),
                                      log_scale.exp(), bias)), [0, 1]
    return None


# ---------------------------------------------------------------------------------------------
# Measurement


def status_bytes(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_LIBC = None


def release_free_memory():
    global _LIBC
    gc.collect()
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Call:
    """One implementation of one case over rotated input sets."""

    def __init__(self, torch, cs, device, compiled, op=None):
        self.torch = torch
        self.cs = cs
        self.device = device
        self.bwd = cs["pass"] == "fwd+bwd"
        fn, self.grad_inputs = op if op is not None else build_op(torch, cs, device)
        if compiled:
            fn = torch.compile(fn)
        self.fn = fn
        self.sets = [make_inputs(torch, cs, s, device) for s in range(rotations(cs))]
        if self.bwd:
            for inputs in self.sets:
                for i in self.grad_inputs:
                    inputs[i].requires_grad_(True)
        self.next = 0

    def __call__(self, check=False):
        torch = self.torch
        inputs = self.sets[self.next]
        self.next = (self.next + 1) % len(self.sets)
        op = self.cs["op"]
        if op == "normalize" and self.bwd:
            x, gy = inputs
            x.grad = None
            y = self.fn(x)
            y.backward(gy)
            if check:
                return (float(y.detach().flatten()[:64].sum()), grad_head(x.grad))
            return None
        if self.bwd:
            for i in self.grad_inputs:
                inputs[i].grad = None
            loss = self.fn(*inputs)
            loss.backward()
            value = loss.item()
            if check:
                g = inputs[self.grad_inputs[0]].grad
                return (value, grad_head(g))
            return None
        with torch.no_grad():
            out = self.fn(*inputs)
            if out.dim() == 0:
                value = out.item()
            elif check:
                value = float(out.flatten()[:64].sum())
            else:
                value = None
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
        return (value, (None, None)) if check else None


@contextlib.contextmanager
def tf32_matmuls(torch, enabled):
    """PyTorch's f32 GEMMs on the TF32 tensor cores while a tf32 case runs, exact f32 otherwise."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def measure(torch, call, device, timing):
    cuda = device.type == "cuda"
    call()  # warm-up (and compilation for torch.compile)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        check = call(check=True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        release_free_memory()
        reset = reset_peak_rss()
        before = status_bytes("VmRSS:")
        check = call(check=True)
        after = status_bytes("VmHWM:")
        peak = after - before if reset and before is not None and after is not None else None
    times = []
    start = time.perf_counter()
    while len(times) < max(timing["max_reps"], 1) and (
            len(times) < max(timing["min_reps"], 1)
            or time.perf_counter() - start < timing["min_time_s"]):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            call()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    mid = len(times) // 2
    median = times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])
    return {
        "median_ms": median,
        "min_ms": times[0],
        "max_ms": times[-1],
        "reps": len(times),
        "peak_bytes": peak,
        "check": check[0],
        "grad_check": check[1][0],
        "grad_abs": check[1][1],
    }


def grad_head(g):
    """The first 64 gradient entries (in f32): their sum and the sum of their magnitudes, the
    scale the sums are compared at (contra's GradCheck)."""
    head = g.flatten()[:64].float()
    return (float(head.sum()), float(head.abs().sum()))


def gemm_peak(torch, device):
    """GFLOP/s of a large f32 GEMM (best of a few): 2048^3 on the CPU, 8192^3 on a GPU."""
    size = 8192 if device.type == "cuda" else 2048
    a = uniform(torch, size * size, 101).reshape(size, size).to(device)
    b = uniform(torch, size * size, 102).reshape(size, size).to(device)
    best = float("inf")
    for i in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        c = a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            best = min(best, time.perf_counter() - t0)
        del c
    return 2.0 * size ** 3 / best / 1e9, f"{size}^3 f32"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", help="JSON file with the case list (what contra bench passes)")
    p.add_argument("--quick", action="store_true", help="the quick case list (default: full)")
    p.add_argument("--list", choices=["quick", "full"], help="print the case ids and exit")
    p.add_argument("--filter", help="only cases whose id contains this")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: every core this process may use)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--no-eager", action="store_true", help="skip eager (with --compile)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per case")
    p.add_argument("--min-reps", type=int, default=None)
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--max-bytes", type=int, default=None,
                   help="skip cases whose eager estimate exceeds this many bytes")
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMM peak measurement")
    p.add_argument("--no-peers", action="store_true",
                   help="leave out the peer libraries' rows (pml, open_clip)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def eager_bytes_estimate(cs):
    """Mirror of Case::eager_bytes_estimate (src/bench/cases.rs)."""
    n, d, k, v = cs["n"], cs["d"], cs["k"], cs["v"]
    op = cs["op"]
    r = n * v if op == "supcon" else n
    if op in ("ntxent", "supcon", "clip", "siglip", "triplet"):
        matrix = r * r
    elif op in ("infonce", "similarity", "nce"):
        matrix = n * k
    elif op == "moco":
        matrix = n * (k + 1)
    elif op in ("margin", "normalize"):
        matrix = n * d
    else:
        matrix = n
    # Eager batch-all and semi-hard build N x N x N tensors (a few of them).
    cube = 4 * 4 * n ** 3 if op == "triplet" and mining(cs) != "batch-hard" else 0
    return 5 * 4 * matrix + cube + 3 * input_bytes(cs)


def write_json(path, payload):
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for cs in quick_cases() if args.list == "quick" else full_cases():
            print(case_id(cs))
        return 0
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install failing at import
        message = (f"PyTorch is not installed for {sys.executable} ({type(e).__name__}: {e}); "
                   "install it (pip install torch) or point CONTRA_TORCH_PYTHON at an "
                   "interpreter that has it")
        print(f"reference_torch.py: {message}", file=sys.stderr)
        write_json(args.json, {"error": "torch-missing", "message": message,
                               "python": sys.executable})
        return EXIT_NO_TORCH

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        message = f"torch {torch.__version__} has no CUDA device here"
        print(f"reference_torch.py: {message}", file=sys.stderr)
        write_json(args.json, {"error": "no-cuda", "message": message})
        return 1
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)

    if args.cases:
        with open(args.cases) as f:
            payload = json.load(f)
        cases = payload["cases"] if isinstance(payload, dict) else payload
    else:
        cases = quick_cases() if args.quick else full_cases()
    for cs in cases:
        cs.setdefault("id", case_id(cs))
    if args.filter:
        cases = [cs for cs in cases if args.filter in cs["id"]]
    quick = args.quick
    timing = {
        "min_time_s": args.min_time if args.min_time is not None else (0.5 if quick else 2.0),
        "min_reps": args.min_reps or (3 if quick else 5),
        "max_reps": args.max_reps or (50 if quick else 200),
    }
    if device.type == "cuda":
        timing["min_reps"] = max(timing["min_reps"], 20)

    info = {
        "torch": torch.__version__,
        "python": sys.executable,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "timing": timing,
    }
    print(f"reference_torch.py: torch {torch.__version__} on {info['device_name']}, "
          f"{info['threads']} threads", file=sys.stderr)
    if not args.no_gemm:
        info["gemm_gflops"], info["gemm_shape"] = gemm_peak(torch, device)
        print(f"reference_torch.py: torch GEMM {info['gemm_shape']}: "
              f"{info['gemm_gflops']:.1f} GFLOP/s", file=sys.stderr)

    impls = ([] if args.no_eager else [("torch-eager", False, None)])
    if args.compile:
        impls.append(("torch-compile", True, None))
    peers = {} if args.no_peers else {name: load_peer(name) for name in PEER_NAMES}
    info["peers"] = {name: (lib["version"] if lib else None) for name, lib in peers.items()}
    for name, lib in peers.items():
        if lib is not None:
            impls.append((name, False, lib))
    if peers:
        found = ", ".join(f"{n} {lib['version']}" for n, lib in peers.items() if lib) or "none"
        missing = ", ".join(n for n, lib in peers.items() if not lib)
        print(f"reference_torch.py: peers: {found}"
              + (f" (not installed: {missing})" if missing else ""), file=sys.stderr)
    results = []
    for cs in cases:
        for name, compiled, lib in impls:
            op = None
            if lib is not None:
                op = build_peer_op(torch, cs, device, name, lib)
                if op is None:
                    continue  # the peer has no class for this loss
            row = {"id": cs["id"], "impl": name}
            estimate = peer_bytes_estimate(cs, name) if lib is not None else eager_bytes_estimate(cs)
            if args.max_bytes is not None and estimate > args.max_bytes:
                row["error"] = f"skipped: needs about {estimate / 2**30:.1f} GiB"
                results.append(row)
                continue
            t0 = time.perf_counter()
            try:
                call = Call(torch, cs, device, compiled, op)
                with tf32_matmuls(torch, cs.get("dtype", "f32") == "tf32"):
                    row.update(measure(torch, call, device, timing))
            except Exception as e:  # noqa: BLE001 - report and go on (compile failures, OOM)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            finally:
                call = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            took = time.perf_counter() - t0
            shown = (f"{row['median_ms']:.3f} ms" if "median_ms" in row else row["error"])
            print(f"reference_torch.py: {name:13} {cs['id']}: {shown} ({took:.1f} s)",
                  file=sys.stderr)
            results.append(row)
    info["results"] = results
    write_json(args.json, info)
    if not args.json:
        json.dump(info, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
