"""Where a run is, checkpointed as one small object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Progress:
    """Optimizer steps done, the epoch, the position in it (rows of the epoch's order consumed), the
    kNN monitor's history (and its score for the untrained network, the baseline that says what
    training bought) and the undecodable images replaced so far."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    evals: list[dict] = field(default_factory=list)
    bad_images: int = 0
    untrained_knn: float | None = None  # the kNN monitor on the network before its first step

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        # (checkpoints written before the kNN history / bad-image count existed have neither)
        self.step, self.epoch, self.offset = state["step"], state["epoch"], state["offset"]
        self.evals, self.bad_images = list(state.get("evals", [])), state.get("bad_images", 0)
        self.untrained_knn = state.get("untrained_knn")
