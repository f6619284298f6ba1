"""Linear probe on frozen features: multinomial logistic regression (full-batch L-BFGS), weight decay
chosen on a validation split carved from the training split, then refit on all of it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ifc_ds.knn import topk_accuracy


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int) -> torch.nn.Linear:
    model = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * weight_decay * model.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, weight_decays=(0.0, 1e-5, 1e-4, 1e-3, 1e-2),
                 val_fraction: float = 0.1, max_iter: int = 200, seed: int = 0) -> dict:
    """Features [n, F] (any scale: standardised with the training statistics). Returns top-1/top-5 on
    the test split, the chosen weight decay and the validation accuracy of every candidate.

    Under a process group (the same features on every rank) the weight-decay sweep is split over the
    ranks and the final fit runs on rank 0; every rank returns the same result."""
    from ifc_ds.collectives import all_gather_object, broadcast_object, rank_in, size

    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(len(train_x) * val_fraction))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    mine = {}
    for wd in list(weight_decays)[rank_in()::size()]:
        model = _fit(train_x[fit_idx], train_y[fit_idx], num_classes, wd, max_iter)
        with torch.no_grad():
            mine[wd] = topk_accuracy(model(train_x[val_idx]), train_y[val_idx], ks=(1,))[1]
    sweep = {wd: acc for part in all_gather_object(mine) for wd, acc in part.items()}
    best = max(sweep, key=lambda wd: (sweep[wd], -wd))
    result = None
    if rank_in() == 0:
        model = _fit(train_x, train_y, num_classes, best, max_iter)
        with torch.no_grad():
            acc = topk_accuracy(model(test_x), test_y, ks=(1, min(5, num_classes)))
        result = {"linear_top1": acc[1], "linear_top5": acc[min(5, num_classes)], "linear_weight_decay": best,
                  "linear_val_sweep": {str(k): sweep[k] for k in weight_decays}}
    return broadcast_object(result)
