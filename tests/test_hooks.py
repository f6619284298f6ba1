import torch

from ifc_ds.classifier import ShardedInstanceClassifier
from ifc_ds.hooks import HardLabelSmoothing, RawFeatureInit, TrainState
from ifc_ds.progress import Progress


def test_smoothing_schedule_off_then_ramp():
    hook = HardLabelSmoothing(k=5, eps=0.2, start_epoch=2, ramp_epochs=2)
    assert hook.eps_at(0.0) == 0.0 and hook.eps_at(1.99) == 0.0
    assert abs(hook.eps_at(3.0) - 0.1) < 1e-9 and hook.eps_at(4.0) == 0.2 and hook.eps_at(9.0) == 0.2
    state = TrainState(engines=None, classifier=None, num_instances=10, steps_per_epoch=10, progress=Progress(step=29))
    hook.before_step(state)  # the next forward is step 31: epoch 3.0
    assert state.smoothing_k == 5 and abs(state.smoothing_eps - 0.1) < 1e-9
    state.progress.step = 0
    hook.on_train_start(state)
    assert (state.smoothing_k, state.smoothing_eps) == (0, 0.0)
    # a resume after 30 steps: its first forward (step 31) gets what before_step gave it in the run that went on
    state.progress.step = 30
    hook.on_train_start(state)
    assert state.smoothing_k == 5 and abs(state.smoothing_eps - 0.1) < 1e-9
    # no ramp: full eps from start_epoch on; k = 0: off whatever eps says
    assert HardLabelSmoothing(k=5, eps=0.2, start_epoch=2, ramp_epochs=0).eps_at(1.99) == 0.0
    assert HardLabelSmoothing(k=5, eps=0.2, start_epoch=2, ramp_epochs=0).eps_at(2.0) == 0.2
    assert HardLabelSmoothing(k=0, eps=0.2, start_epoch=0, ramp_epochs=0).eps_at(5.0) == 0.0


def test_lazy_raw_init_writes_rows_on_first_sight_only():
    clf = ShardedInstanceClassifier(6, 4)
    hook = RawFeatureInit("lazy", 4)
    state = TrainState(engines=None, classifier=clf, num_instances=6, steps_per_epoch=1)
    hook.on_train_start(state)
    first = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])
    hook.on_features(state, first, torch.tensor([1, 3]))
    assert torch.equal(clf.weight[1], torch.tensor([1.0, 0, 0, 0]))
    assert torch.equal(clf.weight[3], torch.tensor([0, 1.0, 0, 0]))
    hook.on_features(state, torch.ones(2, 4), torch.tensor([1, 4]))  # row 1 seen already: kept
    assert torch.equal(clf.weight[1], torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(clf.weight[4], torch.full((4,), 0.5))
    assert hook.seen.tolist() == [False, True, False, True, True, False]
