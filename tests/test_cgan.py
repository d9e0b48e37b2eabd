"""The CMS background system: ROOT tables with safe expressions, the toy dimuon file, the tabular
metrics against hand-computed values, the cGAN's embedding, the cyclic schedule, and a few-step
train -> resume (bit-exact) -> generate run writing a ROOT table with labels."""
from __future__ import annotations

from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import torch
import uproot
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from caloexp.data import dimuon, root_table
from caloexp.data.transforms import Transform
from caloexp.errors import ConfigError, InputError
from caloexp.metrics import tabular
from caloexp.models.cgan import CGAN, Embedded
from caloexp.models.nets import MLP

from conftest import REPO, run_cli, train_twice_and_resume

TREE = "ana/events"


def write_tree(path: Path, n_mu: list[int], mu_pt: list[list[float]], met: list[float], btag: list[list[int]],
               n_el: list[int] | None = None, tree: str = TREE) -> Path:
    branches = {"nMuons": np.array(n_mu, np.int32), "MuonsPt": ak.Array(mu_pt), "MET": np.array(met, np.float32),
                "nElectrons": np.array(n_el or [0] * len(n_mu), np.int32),
                "JetsBTag": ak.values_astype(ak.Array(btag), np.int32)}
    with uproot.recreate(path) as f:
        f.mktree(tree, {k: v.type if isinstance(v, ak.Array) else v.dtype for k, v in branches.items()},
                 counter_name=lambda name: f"n{name}_")
        f[tree].extend(branches)
    return path


@pytest.fixture
def small_root(tmp_path) -> Path:
    # entry:      0            1              2        3            4           5
    return write_tree(tmp_path / "t.root", [2, 2, 1, 3, 2, 2],
                      [[50.0, 20.0], [40.0, 35.0], [30.0], [60.0, 10.0, 5.0], [25.0, 24.0], [70.0, 1.0]],
                      [10.0, 80.0, 5.0, 3.0, 40.0, 1.0], [[0, 1], [], [1], [0], [1, 1, 0], [0, 0]],
                      n_el=[0, 0, 0, 0, 0, 1])


VARS = {"lead": "MuonsPt[0]", "sub": "MuonsPt[1]", "ratio": "MuonsPt[1] / MuonsPt[0] - 0.5", "met": "MET"}
SEL = "nMuons == 2 & nElectrons == 0"
LABEL = "count(JetsBTag[JetsBTag > 0]) > 0"


def test_root_reader_jagged_selection_label_chunks_and_files(small_root, tmp_path):
    x, lab = root_table.read_table([small_root], TREE, VARS, SEL, LABEL)
    # entries 0, 1 and 4 have two muons and no electron
    lead, sub, met = np.array([50, 40, 25.0]), np.array([20, 35, 24.0]), np.array([10, 80, 40.0])
    np.testing.assert_allclose(x, np.stack([lead, sub, sub / lead - 0.5, met], 1), rtol=1e-6)
    np.testing.assert_array_equal(lab, [1, 0, 1])
    assert (x[:, 2] < 0).any()  # signed variables pass
    # one entry per chunk, and the file twice: the same rows, in order
    x1, l1 = root_table.read_table([small_root, small_root], TREE, VARS, SEL, LABEL, step_size=1)
    np.testing.assert_array_equal(x1, np.concatenate([x, x]))
    np.testing.assert_array_equal(l1, np.concatenate([lab, lab]))
    # reductions, masks, where, chained comparisons
    y, _ = root_table.read_table([small_root], TREE, {"n": "count(MuonsPt)", "s": "sum(MuonsPt[MuonsPt > 20])",
                                                      "w": "where(MET > 20, 1, -1)", "m": "max(JetsBTag) + 0"},
                                 "0 < MET < 50 | nMuons == 1")
    np.testing.assert_array_equal(y, [[2, 50, -1, 1], [1, 30, -1, 1], [3, 60, -1, 0], [2, 49, 1, 1], [2, 70, -1, 0]])


@pytest.mark.parametrize("case, kwargs, error, words", [
    ("missing file", dict(paths=["nope.root"]), InputError, ["nope.root", "not found"]),
    ("not root", dict(paths=["junk.root"]), InputError, ["junk.root", "not a readable ROOT file"]),
    ("missing tree", dict(tree="ana/other"), InputError, ["no TTree 'ana/other'", "ana/events"]),
    ("missing branch", dict(variables={"a": "MuonPt[0]"}), InputError, ["no branch 'MuonPt'", "data.variables.a"]),
    ("does not parse", dict(variables={"a": "MuonsPt[0"}), ConfigError, ["data.variables.a", "does not parse"]),
    ("code", dict(selection="__import__('os').system('touch pwned')"), ConfigError, ["data.selection", "unknown function"]),
    ("attribute", dict(variables={"a": "MuonsPt.layout"}), ConfigError, ["syntax not allowed"]),
    ("keeps nothing", dict(selection="nMuons == 7"), InputError, ["keeps no event of 6"]),
    ("non-finite", dict(selection="nMuons >= 1"), InputError, ["variable sub", "NaN/inf", "entry 2"]),
    ("bad label", dict(label="MET - 50"), InputError, ["label", "integers >= 0"]),
    ("list per event", dict(variables={"a": "MuonsPt * 2"}), ConfigError, ["list per event"]),
])
def test_root_reader_errors_are_one_line(small_root, tmp_path, monkeypatch, case, kwargs, error, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.root").write_bytes(b"not a root file at all" * 10)
    args = dict(paths=[small_root], tree=TREE, variables=VARS, selection=SEL, label=LABEL)
    args.update(kwargs)
    args["paths"] = [Path(p) for p in args["paths"]]
    with pytest.raises(error) as info:
        root_table.read_table(args.pop("paths"), **args)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not (tmp_path / "pwned").exists()


def test_bad_expression_stops_the_cli_in_one_line(tmp_path):
    r = run_cli(["caloexp.train", "model=cgan", "data=root", f"data.files=[{tmp_path}/none.root]",
                 "data.selection='open(\"x\", \"w\")'"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "data.selection" in r.stderr and "unknown function" in r.stderr


def test_root_configs_compose_and_name_their_toy():
    from hydra import compose, initialize_config_dir

    from caloexp.build import instantiate
    from caloexp.cli import CONF_DIR
    from caloexp.data.base import DataModule

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=dimuon_embedded", "model=cgan", "paths.data_dir=/nowhere"])
        exp = compose("train", overrides=["+experiment=cgan_cms"])
    dm = instantiate(cfg.data, "data", DataModule)
    assert dm.kind == "tabular" and dm.columns == ["mu_pt", "mass", "met"] and dm.describe()["embedded_toy"]
    assert dm.files == [Path("/nowhere") / "dimuon_toy_seed1234_n400000.root"]
    assert exp.optimizer.nesterov and exp.optimizer.momentum == 0.8 and exp.scheduler.mode == "triangular2"
    assert exp.trainer.gradient_clip_val > 0 and exp.model._target_.endswith("CGAN")
    # the default training (README): TTUR, cosine decay, no generator batch norm; the seed's keeps its BN
    assert cfg.scheduler._target_.endswith("CosineAnnealingLR") and cfg.scheduler.T_max == cfg.trainer.max_steps
    assert cfg.optimizer.critic.lr == 4 * cfg.optimizer.generator.lr and cfg.model.generator.norm == "none"
    assert exp.model.generator.norm == "batch" and exp.trainer.max_steps == 8000


def test_dimuon_toy_is_deterministic_and_b_tagged_class_differs(tmp_path):
    a = dimuon.write_root(tmp_path / "a.root", n_events=4000, seed=3)
    b = dimuon.write_root(tmp_path / "b.root", n_events=4000, seed=3)
    cfg = OmegaConf.load(REPO / "conf/data/root.yaml")
    reads = [root_table.read_table([p], cfg.tree, dict(cfg.variables), cfg.selection, cfg.label) for p in (a, b)]
    np.testing.assert_array_equal(reads[0][0], reads[1][0])
    x, lab = reads[0]
    assert 0.8 * 4000 < len(x) < 0.9 * 4000               # some events fail the selection
    assert 0.15 < lab.mean() < 0.45
    met, mass = x[:, 2], x[:, 1]
    assert np.median(met[lab == 1]) > 3 * np.median(met[lab == 0])
    z = (mass[lab == 0] > 86) & (mass[lab == 0] < 96)
    assert z.mean() > 0.6 and ((mass[lab == 1] > 86) & (mass[lab == 1] < 96)).mean() < 0.4
    assert np.corrcoef(x[lab == 0, 0], mass[lab == 0])[0, 1] > 0.2   # muon pT follows the mass


def test_per_column_log_is_exactly_invertible_with_signed_columns():
    x = torch.tensor([[1.0, -3.0, 0.0], [50.0, 2.5, 120.0], [0.5, -0.1, 7.0]], dtype=torch.float64)
    t = Transform((3,), [{"step": "log", "eps": 1.0, "columns": [0, 2]}, {"step": "normalise"}], nonnegative=False)
    t.fit(x, {})
    y = t(x, {})
    assert torch.isfinite(y).all()
    np.testing.assert_allclose(t.inverse(y, {}).numpy(), x.numpy(), rtol=1e-5, atol=1e-5)
    spec = Transform.from_spec(t.spec())
    assert spec.spec()["steps"][0]["columns"] == [0, 2]
    with pytest.raises(ConfigError, match="columns"):
        Transform((3,), [{"step": "log", "columns": [3]}])


def test_quantile_step_gaussianises_and_inverts_exactly():
    rng = np.random.default_rng(0)
    x = np.stack([rng.exponential(10.0, 4000), 91.0 + rng.standard_cauchy(4000), rng.normal(-3.0, 1.0, 4000)], 1)
    t = Transform((3,), [{"step": "quantile", "knots": 256}], nonnegative=False)
    t.fit(x, {})
    xt = torch.as_tensor(x, dtype=torch.float32)
    z = t(xt, {})
    np.testing.assert_allclose(np.median(z.numpy(), 0), 0.0, atol=0.01)
    np.testing.assert_allclose(np.quantile(z.numpy(), [0.01, 0.99], axis=0), [[-2.326] * 3, [2.326] * 3], atol=0.03)
    back = t.inverse(z, {})
    np.testing.assert_allclose(back.numpy(), x, rtol=2e-5, atol=2e-3)   # float32 round trip
    far = torch.tensor([[-50.0, -1e4, 40.0], [1e4, 1e5, -40.0]])       # outside the training range: still a bijection
    torch.testing.assert_close(t.inverse(t(far, {}), {}), far, rtol=1e-4, atol=1e-2)
    rebuilt = Transform.from_spec(t.spec())
    rebuilt.load_state_dict(t.state_dict())
    torch.testing.assert_close(rebuilt(xt, {}), z)


def test_tabular_metrics_by_hand():
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    gen = np.array([3.0, 4.0, 5.0, 6.0])
    assert tabular.ks_statistic(ref, gen) == 0.5                       # F_ref(2) - F_gen(2) = 0.5 - 0
    v = tabular.variable_metrics(ref[:, None], gen[:, None], "t")
    # 6 distinct values, one bin each: ref (1,1,1,1,0,0)/4, gen (0,0,1,1,1,1)/4; S = 0.5 * 4 * (1/4)^2 / (1/4) = 0.5
    assert v["t/sep_x0"] == pytest.approx(0.5)
    assert v["t/wd_x0"] == pytest.approx(2.0 / np.std(ref))            # a shift by 2
    a = np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 4.0], [4.0, 3.0]])
    # Pearson: cov = (1.25 - 0.25 ... ) by hand: x = y shuffled pairwise: rho = 0.6
    assert tabular.pearson(a)[0, 1] == pytest.approx(0.6)
    b = np.array([[1.0, 1.0], [2.0, 8.0], [3.0, 27.0], [4.0, 64.0]])  # monotone: Spearman 1, Pearson < 1
    assert tabular.spearman(b)[0, 1] == pytest.approx(1.0) and tabular.pearson(b)[0, 1] < 0.99
    rng = np.random.default_rng(0)
    c = rng.normal(size=(300, 3)) ** 3
    np.testing.assert_allclose(tabular.spearman(c), spearmanr(c).statistic, atol=1e-12)
    m = tabular.variable_metrics(a, b, "t")
    assert m["t/corr_max"] == pytest.approx(abs(0.6 - np.corrcoef(b.T)[0, 1]))
    assert m["t/spearman_max"] == pytest.approx(0.4)


def test_classifier_auc_and_class_fidelity():
    rng = np.random.default_rng(1)
    lab = (rng.random(2000) < 0.25).astype(np.int64)
    x = np.stack([rng.normal(4.0 * lab, 1.0), rng.normal(size=2000)], 1)
    same = np.stack([rng.normal(4.0 * lab, 1.0), rng.normal(size=2000)], 1)
    assert abs(tabular.classifier_auc(x, same) - 0.5) < 0.05
    assert tabular.classifier_auc(x, x + 5.0) > 0.99
    good = tabular.class_fidelity(x, lab, same, lab, 2)
    assert good["tab/class_fid/max_dev"] < 0.03
    assert good["tab/class_fid/requested_1"] == pytest.approx(lab.mean())
    swapped = tabular.class_fidelity(x, lab, same, 1 - lab, 2)        # generated classes come out swapped
    assert swapped["tab/class_fid/max_dev"] > 0.9 * abs(1 - 2 * lab.mean()) and \
        abs(swapped["tab/class_fid/generated_1"] - lab.mean()) < 0.03
    assert good["tab/class_fid/recall_dev"] < 0.03 and swapped["tab/class_fid/recall_dev"] > 0.9
    out = tabular.tabular_metrics(x, same, lab, lab)
    assert {"tab/auc", "tab/auc_label", "tab/corr_max_class", "tab/label_1/spearman_max"} <= set(out)


@pytest.mark.parametrize("mode", ["multiply", "concat"])
def test_embedding_conditions_both_nets(mode):
    torch.manual_seed(0)
    model = CGAN((3,), 2, MLP, MLP, embedding=mode, embedding_dim=4, latent_dim=5)
    g = model.generator.net
    assert isinstance(g, Embedded) and g.embed.weight.shape == ((5 if mode == "multiply" else 4), 2)
    z, c0, c1 = torch.randn(8, 5), torch.eye(2)[[0] * 8], torch.eye(2)[[1] * 8]
    model.eval()
    assert not torch.allclose(model.generator(z, c0), model.generator(z, c1))
    assert not torch.allclose(model.criticise(torch.randn(8, 3), c0), model.criticise(torch.randn(8, 3), c1))
    if mode == "multiply":  # a one-hot label picks one embedding row, multiplied into the noise
        inner = g.net(z * g.embed.weight[:, 1])
        torch.testing.assert_close(model.generator(z, c1), inner)
    with pytest.raises(ConfigError, match="embedding"):
        CGAN((3,), 2, MLP, MLP, embedding="add")


def test_cyclic_triangular2_through_the_scheduler_group():
    from caloexp.optim import build_scheduler

    cfg = OmegaConf.load(REPO / "conf/scheduler/cyclic.yaml")
    cfg.step_size_up = 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.8, nesterov=True)
    sched = build_scheduler(cfg, opt)
    lrs = []
    for _ in range(17):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lo, hi = cfg.base_lr, cfg.max_lr
    assert lrs[0] == pytest.approx(lo) and lrs[4] == pytest.approx(hi) and lrs[8] == pytest.approx(lo)
    assert lrs[12] == pytest.approx(lo + (hi - lo) / 2) and lrs[16] == pytest.approx(lo)  # amplitude halves


@pytest.mark.slow
def test_cgan_trains_resumes_bit_exactly_and_generates_a_root_table(tmp_path):
    small = ["model=cgan", "data=dimuon_embedded", "data.files=[toy_small.root]", "data.embedded.n_events=2500",
             "data.eval_events=300", "data.batch_size=64", "model.generator.width=32", "model.critic.width=32",
             "trainer.log_every=2", "trainer.eval_every=6", "trainer.checkpoint_every=3", "trainer.num_threads=1",
             "trainer.plot_every=1", "+model.ema={generator: 0.99}",
             "scheduler.T_max=12"]   # the cosine decay of the full run also in the half run that is resumed
    sa, _ = train_twice_and_resume(["caloexp.train", *small], tmp_path, 12)
    assert sa["spec"]["kind"] == "tabular" and sa["spec"]["writer"]["format"] == "root_table"
    assert (tmp_path / "A/plots/step_0000012/tab_pairs.png").exists()
    out = tmp_path / "gen.root"
    g = run_cli(["caloexp.generate", f"source={sa['run_id']}", "n_showers=400", f"output={out}"], cwd=tmp_path)
    assert g.returncode == 0, g.stderr[-3000:]
    s = root_table.read_output(out)
    assert s.x.shape == (400, 3) and np.isfinite(s.x).all()
    frac = sa["spec"]["writer"]["class_fractions"][1]
    assert abs(s.cond["label"].mean() - frac) < 0.1
    with uproot.open(out) as f:
        assert sorted(f["events"].keys()) == ["label", "mass", "met", "mu_pt"]
    g1 = run_cli(["caloexp.generate", f"source={sa['run_id']}", "n_showers=50", "labels=1", f"output={out}"],
                 cwd=tmp_path)
    assert g1.returncode == 0 and (root_table.read_output(out).cond["label"] == 1).all()
