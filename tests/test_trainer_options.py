"""The trainer in-process on tiny demo data: camera-aware training and its resume, cross-camera
association after clustering, the supervised
ceiling, pseudo-label camera diagnostics, fp32 by default, and no memory update on a step
that the gradient scaler skipped."""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isereid.cli import main
from isereid.clustering import cluster_report
from isereid.clustering.camera import associate_clusters
from isereid.config import load_config
from isereid.data.datasets import ReidDataset, Sample, build_dataset
from isereid.distributed import DistContext
from isereid.engine.records import EpochRecord
from isereid.engine.trainer import Trainer, epoch_memory_config, jaccard_clusterer
from isereid.errors import CheckpointError, ConfigError
from isereid.models import trainable_parameters

TINY = ["optim.epochs=2", "optim.iters=2", "eval.every=2", "data.workers=0", "train.progress=false",
        "train.tensorboard=false", "data.batch_size=32", "model.bn_chunk=16", "data.height=32", "data.width=16",
        "data.pad=2", "cluster.eps=0.5"]


def _trainer(root: Path, out: Path, *overrides: str) -> Trainer:
    cfg = load_config("demo", [*TINY, f"data.root={root}", *overrides])
    torch.manual_seed(cfg.seed)
    return Trainer.from_config(cfg, build_dataset(cfg.data.dataset, cfg.data.root), out, DistContext())


def test_fp32_by_default():
    assert load_config("demo").train.amp is False and load_config("market1501").train.amp is False
    assert load_config("cpu").train.amp is False


def test_camera_aware_run_logs_terms_and_resumes_its_proxies(tiny_demo, tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(tiny_demo, out, "memory.camera_aware=true", "cluster.camera_norm=true")
    history = trainer.run()
    assert [r.epoch for r in history] == [1, 2]
    for record in history:
        assert record.loss_intra > 0 and record.loss_inter > 0
        # total = w_cc cc + w_lp lp + w_intra intra + w_inter inter, per iteration, so also for the epoch means
        m = trainer.cfg.memory
        expected = (m.cluster_weight * record.loss_cc + trainer.cfg.ise.lp_weight * record.loss_lp
                    + m.camera_intra_weight * record.loss_intra + m.camera_inter_weight * record.loss_inter)
        assert record.loss == pytest.approx(expected, abs=1e-4)
        assert 0.0 <= record.cluster["cross_camera_clusters"] <= 1.0
    proxies = trainer.camera_memory
    state = torch.load(out / "checkpoint_last.pt", weights_only=True)
    torch.testing.assert_close(state["camera_memory"]["proxies"], proxies.proxies)
    # A new trainer on the same folder restores the proxies (labels, cameras and the lookup table too).
    again = _trainer(tiny_demo, out, "memory.camera_aware=true", "cluster.camera_norm=true")
    again.resume()
    assert again.start_epoch == 2
    for name in ("proxies", "proxy_labels", "proxy_cams", "index"):
        torch.testing.assert_close(getattr(again.camera_memory, name), getattr(proxies, name))


def test_camera_options_need_two_cameras(tmp_path):
    root = tmp_path / "one_cam"
    root.mkdir()
    samples = [Sample(str(root / f"{i:04d}.jpg"), i % 5, 0) for i in range(40)]
    for s in samples:  # readable: from_config drops unreadable training images
        Image.new("RGB", (16, 32), (40 * (s.pid + 1), 80, 120)).save(s.path)
    dataset = ReidDataset(name="folder", root=root, train=samples, query=[], gallery=[])
    off = ["memory.camera_aware=false", "memory.camera_online=0", "cluster.camera_norm=false"]  # demo turns these on
    for option in ("memory.camera_aware=true", "cluster.camera_norm=true", "cluster.associate=true",
                   "ise.foreign=same_camera", "memory.cluster_online=ignore"):
        cfg = load_config("demo", [*TINY, *off, option])
        with pytest.raises(ConfigError, match="two or more cameras") as err:
            Trainer.from_config(cfg, dataset, tmp_path / "out", DistContext())
        assert "\n" not in str(err.value)
    # The hint names every switch that is on; following it makes the error go away.
    cfg = load_config("cpu", [*TINY, "model.pretrained=false", "model.arch=resnet18"])
    with pytest.raises(ConfigError) as err:
        Trainer.from_config(cfg, dataset, tmp_path / "out", DistContext())
    hint = str(err.value).split("; add ", 1)[1].split(", or ")[0].split()
    assert sorted(hint) == ["cluster.associate=false", "cluster.camera_norm=false", "ise.foreign=any",
                            "memory.camera_aware=false", "memory.camera_online=0"]
    cfg = load_config("cpu", [*TINY, "model.pretrained=false", "model.arch=resnet18", *hint])
    assert Trainer.from_config(cfg, dataset, tmp_path / "out", DistContext()).multi_camera is False


def test_camera_aware_needs_two_instances_per_identity():
    with pytest.raises(ConfigError, match="data.num_instances >= 2"):
        load_config("cpu", ["data.num_instances=1"])
    off = ["memory.camera_aware=false", "memory.camera_online=0"]
    assert load_config("cpu", ["data.num_instances=1", *off]).data.num_instances == 1


def test_clusterer_associates_after_dbscan():
    """cluster.associate runs on DBSCAN's labels: 6 people x 2 cameras, where camera 1 turns each
    person's vector part-way into another subspace, give camera-pure clusters (own-camera views at
    cosine ~1, the other camera's at ~0.6), and the association joins each person's two."""
    g = torch.Generator().manual_seed(0)
    people = torch.nn.functional.normalize(torch.randn(6, 32, generator=g), dim=1)
    turn = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    views = torch.stack([people, 0.6 * people + 0.8 * people @ turn])  # (camera, person, D)
    pid = torch.arange(6).repeat_interleave(10)
    cams = np.tile(np.repeat([0, 1], 5), 6)
    x = torch.nn.functional.normalize(views[cams, pid] + 0.03 * torch.randn(60, 32, generator=g), dim=1)
    # The colour cue (on in the preset) needs images; these are bare feature rows.
    overrides = ["cluster.k1=5", "cluster.k2=1", "cluster.eps=0.6", "cluster.min_samples=3", "cluster.colour_weight=0"]
    plain = jaccard_clusterer(load_config("demo", [*overrides, "cluster.associate=false"]).cluster)(x, cams)
    np.testing.assert_array_equal(plain, pid.numpy() * 2 + cams)  # one cluster per person and camera
    cfg = load_config("demo", [*overrides, "cluster.associate=true", "cluster.associate_min_similarity=0.3"]).cluster
    clusterer = jaccard_clusterer(cfg)
    joined = clusterer(x, cams)
    np.testing.assert_array_equal(joined, associate_clusters(x, plain, cams, 0.3))
    np.testing.assert_array_equal(joined, pid.numpy())
    # the record says what the association looked at: six mutual pairs at cosine ~0.6, all merged
    pairs = clusterer.scale["association"]
    assert (pairs["mutual_pairs"], pairs["merged"], pairs["below_threshold"]) == (6, 6, 0)
    assert 0.5 < pairs["merged_similarity_median"] < 0.7 and pairs["rejected_similarity_median"] is None
    strict = jaccard_clusterer(load_config("demo", [*overrides, "cluster.associate=true",
                                                   "cluster.associate_min_similarity=0.9"]).cluster)
    np.testing.assert_array_equal(strict(x, cams), plain)
    assert (strict.scale["association"]["merged"], strict.scale["association"]["below_threshold"]) == (0, 6)
    # "auto" from the config: the gate lies between other people of one camera (cosine ~0.2) and a
    # person's two views (~0.6), so the same six pairs merge, and the record names the gate
    gated = jaccard_clusterer(load_config("demo", [*overrides, "cluster.associate=true",
                                                  "cluster.associate_min_similarity=auto"]).cluster)
    np.testing.assert_array_equal(gated(x, cams), pid.numpy())
    gate = gated.scale["association"]["threshold"]
    assert 0.0 < gate < 0.45 and strict.scale["association"]["threshold"] == 0.9


def test_auto_eps_goes_into_the_record_and_the_progress_line(tiny_demo, tmp_path, caplog):
    trainer = _trainer(tiny_demo, tmp_path / "auto", "cluster.eps=auto", "cluster.k1=6", "cluster.k2=3")
    record = trainer.update_pseudo_labels(0)
    cluster = record["cluster"]
    eps, scale = cluster["eps"], cluster["scale"]
    assert 0 < eps < 1 and scale["eps"] == eps and 0 < scale["core_share"] <= 1
    assert scale["statistic"] == "otsu split of core distances" and trainer.cfg.cluster.eps == "auto"
    json.dumps(cluster)  # metrics.jsonl-ready
    line = EpochRecord(epoch=1, loss=1.0, loss_cc=1.0, loss_lp=0.0, lr=0.1, seconds=1.0, interpolation_weight=0.0,
                       **record)
    with caplog.at_level(logging.INFO, logger="isereid"):
        trainer.run_log.epoch(line)
    assert f"eps {eps:.3f} (auto, {100 * scale['core_share']:.0f}% core)" in caplog.text


def test_auto_clusterer_equals_fixed_at_the_chosen_eps():
    g = torch.Generator().manual_seed(1)
    centres = torch.nn.functional.normalize(torch.randn(8, 32, generator=g), dim=1)
    x = torch.nn.functional.normalize(centres.repeat_interleave(12, 0) + 0.15 * torch.randn(96, 32, generator=g), dim=1)
    cams = np.tile([0, 1], 48)
    overrides = ["cluster.k1=8", "cluster.k2=3", "cluster.camera_norm=true", "cluster.colour_weight=0"]
    auto = jaccard_clusterer(load_config("demo", [*overrides, "cluster.eps=auto"]).cluster)
    labels = auto(x, cams)
    eps = auto.scale["eps"]
    fixed = jaccard_clusterer(load_config("demo", [*overrides, f"cluster.eps={eps!r}"]).cluster)
    np.testing.assert_array_equal(labels, fixed(x, cams))
    # the demo preset associates clusters: the same labels, so the same association record
    assert fixed.scale == {"eps": eps, "association": auto.scale["association"]} and labels.max() >= 1


def test_supervised_uses_true_identities(tiny_demo, tmp_path):
    trainer = _trainer(tiny_demo, tmp_path / "sup", "train.supervised=true", "optim.epochs=1", "eval.every=1")
    record = trainer.update_pseudo_labels(0)
    truth = np.array([s.pid for s in trainer.train_samples])
    # labels are the identities renumbered 0..M-1 in order: a bijection, no outliers
    np.testing.assert_array_equal(trainer.pseudo_labels, np.unique(truth, return_inverse=True)[1])
    assert record["num_outliers"] == 0 and record["cluster"]["nmi"] == pytest.approx(1.0)
    unlabeled = ReidDataset(name="folder", root=tiny_demo, train=[Sample(s.path, -1, s.camid)
                                                                  for s in trainer.train_samples],
                            query=[], gallery=[])
    with pytest.raises(ConfigError, match="train.supervised=true needs identities"):
        Trainer.from_config(trainer.cfg, unlabeled, tmp_path / "x", DistContext())


@pytest.mark.parametrize("switches,hint", [
    (("false", "false", "false", "0", "any"),
     "try memory.camera_aware=true cluster.camera_norm=true cluster.associate=true ise.foreign=same_camera "
     "memory.camera_online=1 ("),
    (("true", "false", "false", "0", "same_camera"),
     "try cluster.camera_norm=true cluster.associate=true memory.camera_online=1 ("),
    (("true", "true", "false", "1", "same_camera"), "try cluster.associate=true ("),
    (("true", "true", "true", "0", "same_camera"), "try memory.camera_online=1 ("),
    (("true", "true", "true", "1", "any"), "try ise.foreign=same_camera ("),
    (("true", "true", "true", "1", "same_camera"), "try a longer schedule"),
    (("true", "true", "true", "1", "same_camera", "0"), "try cluster.colour_weight=0.5 ("),
    (("true", "true", "false", "1", "same_camera", "0"), "try cluster.associate=true cluster.colour_weight=0.5 ("),
])
def test_camera_pure_warning(tiny_demo, tmp_path, caplog, switches, hint):
    aware, norm, associate, online, foreign = switches[:5]
    colour = switches[5] if len(switches) > 5 else "0.5"  # the colour cue's weight (the preset's by default)
    trainer = _trainer(tiny_demo, tmp_path / "w", f"memory.camera_aware={aware}", f"cluster.camera_norm={norm}",
                       f"cluster.associate={associate}", f"memory.camera_online={online}", f"ise.foreign={foreign}",
                       f"cluster.colour_weight={colour}")
    labels = np.where(trainer.camids == 0, 0, 1)  # one cluster per camera (3 cameras -> 0 and 1)
    labels[trainer.camids == 2] = 2
    report = cluster_report(labels, cameras=trainer.camids)
    assert report.cross_camera_clusters == 0.0
    with caplog.at_level(logging.WARNING, logger="isereid"):
        trainer._warn_camera_pure(0, report)
    assert "camera-pure" in caplog.text and hint in caplog.text
    caplog.clear()
    mixed = cluster_report(np.arange(len(labels)) % 3, cameras=trainer.camids)
    with caplog.at_level(logging.WARNING, logger="isereid"):
        trainer._warn_camera_pure(0, mixed)
    assert "camera-pure" not in caplog.text


class _SkippingScaler:
    """Stands in for a CUDA GradScaler that finds inf gradients: no optimizer step, scale halved."""

    def __init__(self):
        self.scale_value = 1024.0
        self.steps = 0

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale_value

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        pass

    def step(self, optimizer):
        pass  # skipped

    def update(self):
        self.scale_value /= 2


def test_memory_not_updated_on_a_skipped_step(tiny_demo, tmp_path):
    trainer = _trainer(tiny_demo, tmp_path / "s", "memory.camera_aware=true", "optim.iters=1")
    trainer.update_pseudo_labels(0)
    before = trainer.memory.centroids.clone()
    proxies = trainer.camera_memory.proxies.clone()
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.scaler = _SkippingScaler()
    trainer.train_epoch(0)
    torch.testing.assert_close(trainer.memory.centroids, before, rtol=0, atol=0)
    torch.testing.assert_close(trainer.camera_memory.proxies, proxies, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))
    # the same iteration with a real (CPU, disabled) scaler does move the memory
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer.train_epoch(0)
    assert not torch.equal(trainer.memory.centroids, before)
    assert not torch.equal(trainer.camera_memory.proxies, proxies)


def test_metrics_jsonl_has_camera_diagnostics(tiny_demo, tmp_path):
    out = tmp_path / "diag"
    _trainer(tiny_demo, out, "optim.epochs=1", "eval.every=1").run()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    c = record["cluster"]
    assert {"cross_camera_clusters", "cross_camera_images", "nmi"} <= set(c)
    assert 0.0 <= c["cross_camera_images"] <= 1.0
    assert 0.0 <= c["mutual_cross_camera"] <= 1.0 and 0.0 <= c["cross_camera_nn_accuracy"] <= 1.0
    assert {"extract", "cluster", "train", "data_wait", "evaluate"} <= set(record["phases"])
    assert record["phases"]["data_wait"] <= record["phases"]["train"] <= record["seconds"]


def test_each_clustering_after_the_first_records_its_agreement_with_the_previous_labels(tiny_demo, tmp_path):
    from isereid.clustering import label_agreement
    from isereid.engine.run_state import LABELS

    out = tmp_path / "agree"
    _trainer(tiny_demo, out, "optim.epochs=2").run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["cluster"]["previous_agreement"] is None  # nothing to compare the first clustering with
    first, second = (np.load(out / LABELS / f"epoch_{e:03d}.npz")["labels"] for e in (1, 2))
    assert records[1]["cluster"]["previous_agreement"] == pytest.approx(label_agreement(first, second), abs=1e-6)


@pytest.mark.parametrize("foreign", ["any", "same_camera"])
def test_same_camera_foreign_centroids_reach_the_supports(tiny_demo, tmp_path, monkeypatch, foreign):
    import isereid.engine.step as step

    seen = []
    real = step.support_samples

    def spy(features, labels, centroids, weight, topk=1, allowed=None):
        seen.append((labels.clone(), None if allowed is None else allowed.clone()))
        return real(features, labels, centroids, weight, topk=topk, allowed=allowed)

    monkeypatch.setattr(step, "support_samples", spy)
    trainer = _trainer(tiny_demo, tmp_path / foreign, f"ise.foreign={foreign}", "optim.iters=2")
    trainer.update_pseudo_labels(0)
    trainer.train_epoch(0)
    assert len(seen) == 2
    if foreign == "any":
        assert all(allowed is None for _, allowed in seen)
        return
    keep = trainer.pseudo_labels >= 0
    cams = np.unique(trainer.camids, return_inverse=True)[1].ravel()
    holds = np.zeros((trainer.pseudo_labels.max() + 1, cams.max() + 1), dtype=bool)
    holds[trainer.pseudo_labels[keep], cams[keep]] = True
    for labels, allowed in seen:
        assert allowed.shape == (len(labels), holds.shape[0])
        for b, y in enumerate(labels.tolist()):
            # each row's candidates are exactly the clusters seen by one camera of its own cluster
            row = allowed[b].numpy()
            assert any((row == holds[:, c]).all() for c in np.flatnonzero(holds[y]))
        assert not allowed.all()  # some clusters are excluded


def test_cluster_online_gets_each_clusters_cameras_without_changing_the_supports(tiny_demo, tmp_path, monkeypatch):
    import isereid.engine.step as step

    seen = []
    real = step.ise_losses

    def spy(features, labels, memory, weight, ise, memory_cfg, allowed=None, cluster_cameras=None):
        seen.append((memory_cfg.cluster_online, allowed, None if cluster_cameras is None else cluster_cameras.clone()))
        return real(features, labels, memory, weight, ise, memory_cfg, allowed, cluster_cameras)

    monkeypatch.setattr(step, "ise_losses", spy)
    trainer = _trainer(tiny_demo, tmp_path / "on", "ise.foreign=any", "memory.cluster_online=positive")
    trainer.update_pseudo_labels(0)
    record = trainer.train_epoch(0)
    assert np.isfinite(record["loss_cc"])
    keep = trainer.pseudo_labels >= 0
    holds = torch.zeros(trainer.pseudo_labels.max() + 1, trainer.camids.max() + 1, dtype=torch.bool)
    holds[trainer.pseudo_labels[keep], trainer.camids[keep]] = True
    assert len(seen) == 2
    for mode, allowed, cameras in seen:
        assert mode == "positive" and allowed is None  # ise.foreign=any: the supports are the reference's
        assert torch.equal(cameras, holds)
    seen.clear()
    off = _trainer(tiny_demo, tmp_path / "off", "ise.foreign=any")
    off.update_pseudo_labels(0)
    off.train_epoch(0)
    assert [cameras for _, _, cameras in seen] == [None, None]


def test_cached_images_train_exactly_as_decoded_ones(tiny_demo, tmp_path):
    import random

    results = []
    for cache in ("false", "true"):
        random.seed(0)
        trainer = _trainer(tiny_demo, tmp_path / cache, f"data.cache_images={cache}", "optim.iters=2")
        trainer.update_pseudo_labels(0)
        trainer.train_epoch(0)
        results.append((trainer.pseudo_labels, trainer.memory.centroids.clone(),
                        [p.detach().clone() for p in trainer.model.parameters()]))
        if cache == "true":
            assert len(trainer.image_cache) == len(trainer.train_samples)
        else:
            assert trainer.image_cache is None
    (labels_a, cents_a, params_a), (labels_b, cents_b, params_b) = results
    np.testing.assert_array_equal(labels_a, labels_b)
    torch.testing.assert_close(cents_a, cents_b, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_from_config_trains_as_the_cli_does(tiny_demo, tmp_path):
    """Seeding and train.log are the trainer's, not the command line's: a Python run started from
    any RNG state ends bit-identical to `isereid train` (same labels, same weights)."""
    import random

    overrides = [*TINY, "optim.epochs=1"]
    cli_out, py_out = tmp_path / "cli", tmp_path / "py"
    assert main(["train", "--config", "demo", "--data-root", str(tiny_demo), "--output-dir", str(cli_out),
                 *overrides]) == 0
    random.seed(7), np.random.seed(7), torch.manual_seed(7)  # whatever the caller did before
    cfg = load_config("demo", [*overrides, f"data.root={tiny_demo}", f"output_dir={py_out}"])
    Trainer.from_config(cfg, build_dataset(cfg.data.dataset, cfg.data.root), py_out, DistContext()).run()
    first = [np.load(out / "labels" / "epoch_001.npz")["labels"] for out in (cli_out, py_out)]
    np.testing.assert_array_equal(*first)
    cli_state, py_state = (torch.load(out / "checkpoint_last.pt", weights_only=False)["state_dict"]
                           for out in (cli_out, py_out))
    assert cli_state.keys() == py_state.keys()
    assert all(torch.equal(cli_state[k], py_state[k]) for k in cli_state)
    py_log = (py_out / "train.log").read_text()
    assert "epoch 1/1" in py_log
    cli_log = (cli_out / "train.log").read_text()  # the command's lines and the trainer's, each once
    assert cli_log.count("config: preset demo") == 1 and cli_log.count("epoch 1/1") == 1


def test_from_config_drops_unreadable_training_images(tiny_demo, tmp_path, caplog):
    root = tmp_path / "broken"
    shutil.copytree(tiny_demo, root)
    broken = sorted((root / "bounding_box_train").iterdir())[:2]
    for path in broken:
        path.write_bytes(path.read_bytes()[:60])
    cfg = load_config("demo", [*TINY, f"data.root={root}", "data.max_bad_fraction=0.5"])
    with caplog.at_level(logging.INFO, logger="isereid"):
        trainer = Trainer.from_config(cfg, build_dataset(cfg.data.dataset, cfg.data.root), tmp_path / "out",
                                      DistContext())
    kept = {Path(s.path).name for s in trainer.train_samples}
    assert not kept & {p.name for p in broken} and len(kept) > 0
    assert "skipping 2 unreadable training image(s)" in caplog.text


def test_a_camera_with_one_training_image_trains_camera_aware(tiny_demo, tmp_path):
    """A camera that holds a single training image is a defined case, not an error: camera
    normalisation leaves its row as it is, and it gets proxies like any camera."""
    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root)
    train = root / "bounding_box_train"
    first = sorted(train.glob("*.jpg"))[0]
    shutil.copy(first, train / ("9999_c9s1_000001_01.jpg"))  # camera 9: one image, a person of its own
    trainer = _trainer(root, tmp_path / "run", "memory.camera_aware=true", "cluster.camera_norm=true",
                       "cluster.associate=true", "ise.foreign=same_camera", "memory.camera_online=1")
    assert int((trainer.camids == trainer.camids.max()).sum()) == 1
    history = trainer.run()
    assert [r.epoch for r in history] == [1, 2]
    assert all(np.isfinite(r.loss) for r in history)


def test_frozen_leading_blocks_keep_their_weights_through_training_and_resume(tiny_demo, tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(tiny_demo, out, "model.freeze_blocks=5")  # ResNet: conv1, bn1, relu, maxpool, layer1
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    end = trainer.model.state_dict()
    for key in ("base.0.weight", "base.1.weight", "base.4.0.conv1.weight"):
        assert torch.equal(start[key], end[key]), key
    assert not torch.equal(start["base.5.0.conv1.weight"], end["base.5.0.conv1.weight"])
    assert not torch.equal(start["base.1.running_mean"], end["base.1.running_mean"])  # statistics still follow
    # The same setting resumes with the optimizer over the same parameter list; another is refused.
    again = _trainer(tiny_demo, out, "model.freeze_blocks=5")
    again.resume()
    assert again.start_epoch == 2
    assert len(again.optimizer.state_dict()["param_groups"][0]["params"]) == len(trainable_parameters(again.model))
    assert torch.equal(again.model.state_dict()["base.0.weight"], start["base.0.weight"])
    with pytest.raises(CheckpointError, match=r"model.freeze_blocks"):
        _trainer(tiny_demo, out, "model.freeze_blocks=4").resume()


def test_the_online_association_waits_for_its_first_epoch(tiny_demo, tmp_path):
    mem = load_config("demo", ["memory.camera_online=1", "memory.camera_online_start=2"]).memory
    assert [epoch_memory_config(mem, e).camera_online for e in range(4)] == [0, 0, 1, 1]
    assert epoch_memory_config(mem, 2) is mem
    params = {}
    for name, online, start in (("off", 0, 0), ("waits", 1, 1), ("on", 1, 0)):
        random.seed(0)
        trainer = _trainer(tiny_demo, tmp_path / name, "memory.camera_aware=true", "cluster.camera_norm=true",
                           f"memory.camera_online={online}", f"memory.camera_online_start={start}")
        trainer.update_pseudo_labels(0)
        trainer.train_epoch(0)
        params[name] = [p.detach().clone() for p in trainer.model.parameters()]
    # Epoch 0 before the start trains exactly as without the online term; with it from epoch 0, it differs.
    assert all(torch.equal(a, b) for a, b in zip(params["off"], params["waits"]))
    assert not all(torch.equal(a, b) for a, b in zip(params["off"], params["on"]))
    with pytest.raises(ConfigError, match="camera_online_start"):
        load_config("demo", ["memory.camera_online_start=-1"])
