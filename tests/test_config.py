"""Config loading: inheritance, overrides, validation messages, saving."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mohico.config import Config, config_from_dict, config_hash, load_config, save_config, to_dict
from mohico.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ["base.yaml", "tiny_cpu.yaml", "mcl_r2plus1d_k400.yaml", "hico_s3d_uk400.yaml", "msnet_r50.yaml"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, Config)


def test_paper_hyperparameters():
    mcl = load_config(ROOT / "configs" / "mcl_r2plus1d_k400.yaml")
    assert (mcl.bank.size, mcl.objectives.mcl.tau, mcl.objectives.mcl.momentum) == (131072, 0.1, 0.999)
    assert (mcl.optim.name, mcl.optim.lr, mcl.optim.weight_decay, mcl.optim.min_lr) == ("sgd", 0.02, 1e-4, 1e-6)
    assert mcl.optim.decay_norm_and_bias                       # official MCL: SGD decays every parameter
    assert (mcl.data.clip_len, mcl.data.frame_stride, mcl.data.crop_size) == (16, 2, 224)
    assert (mcl.objectives.mcl.mal.warmup_weight, mcl.objectives.mcl.mal.weight) == (2.0, 1.0)
    assert mcl.objectives.mcl.mal.variant == "weighted_gradient_map"
    hico = load_config(ROOT / "configs" / "hico_s3d_uk400.yaml")
    assert hico.objectives.mcl.weight == 0 and hico.objectives.hico.weight == 1
    assert (hico.optim.name, hico.optim.lr, hico.optim.weight_decay) == ("lars", 0.3, 1e-6)
    assert not hico.optim.decay_norm_and_bias                  # official HiCo: BN and bias exempt
    assert load_config(ROOT / "configs" / "msnet_r50.yaml").optim.decay_norm_and_bias   # MCL-pretrained
    assert hico.optim.scale_lr_with_batch
    assert (hico.objectives.hico.focal_gamma, hico.sampling.delta, hico.data.frame_stride) == (0.5, 1.0, 4)
    assert hico.sampling.crop_area == [0.324, 0.576]
    assert hico.data.augment.color_jitter == [0.8, 0.8, 0.8, 0.2]
    # official pt-k400f/s3dg-hico-l.yaml (alibaba-mmai-research/HiCo): global-batch negatives, 500 epochs
    # with 50 warm-up epochs from lr 0.001, LARS with Nesterov; its blur is a 1 x 1 kernel, the identity
    assert not hico.objectives.hico.use_bank
    assert hico.trainer.max_steps == 500 * hico.trainer.steps_per_epoch and hico.optim.warmup_epochs == 50
    assert (hico.optim.warmup_start_lr, hico.optim.nesterov) == (0.001, True)
    assert hico.data.augment.blur_prob == 0.0
    assert mcl.sampling.crop_rule == "official" and mcl.model.init == ""
    assert load_config(ROOT / "configs" / "base.yaml").sampling.crop_rule == "percentile"
    ms = load_config(ROOT / "configs" / "msnet_r50.yaml")
    assert ms.model.backbone == "msnet_resnet50"
    assert ms.model.backbone_options["radius"] == 7 and ms.model.backbone_options["temperature"] == 100.0


def test_inheritance_chain_and_precedence(tmp_path):
    write(tmp_path / "a.yaml", "optim: {lr: 0.5, momentum: 0.8}\ntrainer: {max_steps: 7}\nobjectives: {mcl: {weight: 1}}\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\noptim: {lr: 0.25}\n")
    write(tmp_path / "c.yaml", "defaults: [b.yaml]\ntrainer: {seed: 9}\n")
    cfg = load_config(tmp_path / "c.yaml", ["optim.momentum=0.5"])
    assert cfg.optim.lr == 0.25           # child beats parent
    assert cfg.optim.momentum == 0.5      # command line beats every file
    assert cfg.trainer.max_steps == 7     # grandparent value survives
    assert cfg.trainer.seed == 9


def test_overrides_types_and_interpolation(tmp_path):
    write(tmp_path / "x.yaml", "objectives: {mcl: {weight: 1}}\nrun: {dir: /tmp/r, name: 'seed-${trainer.seed}'}\n")
    cfg = load_config(tmp_path / "x.yaml", ["trainer.seed=3", "optim.lr=0.02", "data.mean=[0.1,0.2,0.3]"])
    assert cfg.trainer.seed == 3 and isinstance(cfg.trainer.seed, int)
    assert cfg.optim.lr == pytest.approx(0.02)
    assert cfg.data.mean == [0.1, 0.2, 0.3]
    assert cfg.run.name == "seed-3"  # interpolation resolved after the overrides are merged


def test_unknown_key_names_file_and_suggestion(tmp_path):
    f = write(tmp_path / "bad.yaml", "objectives: {mcl: {weight: 1}}\noptim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "optim.lrr" in msg and "bad.yaml" in msg and "did you mean 'optim.lr'" in msg


def test_unknown_key_in_wrong_section_suggests_the_right_one(tmp_path):
    f = write(tmp_path / "bad.yaml", "objectives: {mcl: {weight: 1}}\noptim: {zero_stage: 2}\n")
    with pytest.raises(ConfigError, match=r"did you mean 'trainer.zero_stage'"):
        load_config(f)


def test_unknown_section(tmp_path):
    f = write(tmp_path / "bad.yaml", "objectives: {mcl: {weight: 1}}\noptimizer: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'.*did you mean 'optim'"):
        load_config(f)


def test_unknown_backbone_and_option_named_without_importing_the_models():
    """config validates model.backbone / model.backbone_options from the bottom floor: in a fresh
    interpreter, load_config refuses a misspelt name and option and mohico.models stays unloaded."""
    code = textwrap.dedent("""\
        import sys
        from mohico.config import load_config
        from mohico.errors import ConfigError
        out = []
        for over in (["model.backbone=r2plus1d18"], ["model.backbone=msnet_resnet18", "model.backbone_options={radus: 3}"]):
            try:
                load_config(None, ["objectives.mcl.weight=1", *over])
                out.append("accepted")
            except ConfigError as e:
                out.append(str(e))
        out.append(str(any(m.startswith("mohico.models") for m in sys.modules)))
        print("\\n".join(out))
        """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    name_err, option_err, models_loaded = res.stdout.strip().splitlines()
    assert name_err.startswith("'model.backbone': unknown backbone 'r2plus1d18'; did you mean 'r2plus1d_18'?")
    assert "msnet_resnet50" in name_err
    assert option_err.startswith("'model.backbone_options.radus': backbone 'msnet_resnet18' has no option 'radus'; "
                                 "did you mean 'radius'?")
    assert models_loaded == "False"


def test_unknown_override_names_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: unknown key 'trainer.max_step'.*'trainer.max_steps'"):
        load_config(ROOT / "configs" / "base.yaml", ["trainer.max_step=3"])


def test_wrong_type_names_key_and_file(tmp_path):
    f = write(tmp_path / "bad.yaml", "objectives: {mcl: {weight: 1}}\ntrainer: {max_steps: lots}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "trainer.max_steps" in str(e.value) and "bad.yaml" in str(e.value) and "integer" in str(e.value)


def test_wrong_type_from_override_names_command_line():
    with pytest.raises(ConfigError, match=r"command line: 'trainer.deterministic' must be true or false"):
        load_config(ROOT / "configs" / "base.yaml", ["trainer.deterministic=maybe"])


def test_bad_choice_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.name' must be one of .*did you mean 'lars'"):
        load_config(ROOT / "configs" / "base.yaml", ["optim.name=lasr"])


def test_bad_list_element_type(tmp_path):
    with pytest.raises(ConfigError, match=r"data.mean\[1\]"):
        load_config(ROOT / "configs" / "base.yaml", ["data.mean=[0.1,x,0.3]"])


def test_section_must_be_mapping(tmp_path):
    f = write(tmp_path / "bad.yaml", "optim: 3\n")
    with pytest.raises(ConfigError, match=r"'optim' must be a mapping"):
        load_config(f)


def test_cross_field_rules():
    for overrides in (["trainer.zero_stage=3"], ["trainer.zero_stage=3", "objectives.mcl.mal_enabled=false"]):
        with pytest.raises(ConfigError, match=r"trainer.zero_stage.*double backprop.*EMA"):
            load_config(ROOT / "configs" / "base.yaml", overrides)
    with pytest.raises(ConfigError, match=r"objectives.mcl.mal.*all false"):
        load_config(ROOT / "configs" / "base.yaml", ["objectives.mcl.mal.st=false", "objectives.mcl.mal.s=false",
                                                      "objectives.mcl.mal.t=false"])
    with pytest.raises(ConfigError, match=r"no objective is enabled"):
        load_config(ROOT / "configs" / "base.yaml", ["objectives.mcl.weight=0"])
    with pytest.raises(ConfigError, match=r"bank.dim.*model.proj_dim"):
        load_config(ROOT / "configs" / "base.yaml", ["bank.dim=64"])
    with pytest.raises(ConfigError, match=r"sampling.crop_area"):
        load_config(ROOT / "configs" / "base.yaml", ["sampling.crop_area=[0.9,0.2]"])


def test_negative_bank_size_names_bank_size():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "base.yaml", ["bank.size=-5"])
    assert str(e.value).startswith("'bank.size'") and "bank.dim" not in str(e.value) and "-5" in str(e.value)


def test_missing_file_cycle_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "p.yaml", "defaults: [q.yaml]\n")
    write(tmp_path / "q.yaml", "defaults: [p.yaml]\n")
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_config(tmp_path / "p.yaml")
    write(tmp_path / "y.yaml", "optim: {lr: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "y.yaml")
    write(tmp_path / "m.yaml", "defaults: [missing.yaml]\n")
    with pytest.raises(ConfigError, match=r"missing.yaml.*inherited by"):
        load_config(tmp_path / "m.yaml")


def test_yaml_is_safe_loaded(tmp_path):
    f = write(tmp_path / "evil.yaml", "run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load_config(f)


def test_save_round_trip_and_hash(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert config_from_dict(to_dict(cfg)) == cfg
    assert config_hash(again) == config_hash(cfg)
    # run paths and logging do not change the hash; the trajectory does
    assert config_hash(load_config(path, ["run.dir=/elsewhere", "wandb.mode=disabled"])) == config_hash(cfg)
    assert config_hash(load_config(path, ["optim.lr=0.123"])) != config_hash(cfg)
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_a_dotted_override_inside_a_mapping_sets_one_entry():
    """`model.backbone_options.width=4` changes width and keeps the config's other options (it used
    to replace the whole mapping, silently dropping `input: residual` from motion_bench_cpu.yaml);
    `model.backbone_options={...}` still replaces the mapping."""
    cfg = ROOT / "configs" / "motion_bench_cpu.yaml"
    assert load_config(cfg).model.backbone_options == {"width": 8, "input": "residual"}
    assert load_config(cfg, ["model.backbone_options.width=4"]).model.backbone_options == \
        {"width": 4, "input": "residual"}
    assert load_config(cfg, ["model.backbone_options.input=rgb", "optim.lr=0.1"]).model.backbone_options == \
        {"width": 8, "input": "rgb"}
    assert load_config(cfg, ["model.backbone_options={width: 4}"]).model.backbone_options == {"width": 4}
    assert load_config(cfg, ["model.backbone_options={}"]).model.backbone_options == {}
    # both forms at once: the whole mapping, then the entry
    assert load_config(cfg, ["model.backbone_options={width: 4}", "model.backbone_options.input=rgb"]
                       ).model.backbone_options == {"width": 4, "input": "rgb"}


def test_a_packaged_config_by_bare_name_resolves_and_the_not_found_message_lists_them(tmp_path, monkeypatch):
    """Issue 28 item 3: `mohico train tiny_cpu` (the repo's configs/ from its root, else mohico/configs/)."""
    monkeypatch.chdir(ROOT)
    assert load_config("tiny_cpu").run.dir == load_config(ROOT / "configs" / "tiny_cpu.yaml").run.dir
    monkeypatch.chdir(tmp_path)                    # elsewhere: the copy installed with mohico
    assert load_config("tiny_cpu.yaml").model.backbone_options == {"width": 8}
    assert load_config("configs/tiny_cpu").data.crop_size == 32
    with pytest.raises(ConfigError) as e:
        load_config("tiny")
    assert "config file not found" in str(e.value) and "tiny_cpu" in str(e.value) and "base" in str(e.value)
    res = subprocess.run([sys.executable, "-m", "mohico", "train", "tiny_cpu", "--dry-run"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert "config file not found" not in res.stderr and "crop_size: 32" in res.stdout, res.stderr[-2000:]


def test_the_enabled_objectives_and_the_shuffle_buffer_rule_are_said_once_in_the_config():
    """``objectives.enabled`` (which objectives are on, what the model, loader, dry run and the
    rules read) and the shuffle buffer's bound (the loader's warning) from the config side."""
    from mohico.config_validate import shuffle_buffer_advice

    cfg = load_config(ROOT / "configs" / "base.yaml")
    assert cfg.objectives.enabled == tuple(n for n in ("mcl", "hico")
                                           if getattr(cfg.objectives, n).weight > 0) and cfg.objectives.enabled
    both = load_config(ROOT / "configs" / "base.yaml", ["objectives.hico.weight=0.5"])
    assert both.objectives.enabled == ("mcl", "hico") and both.objectives.num_views == 3
    hico = load_config(ROOT / "configs" / "base.yaml", ["objectives.hico.weight=1", "objectives.mcl.weight=0"])
    assert hico.objectives.enabled == ("hico",)
    d = cfg.data
    d.batch_size, d.samples_per_read = 4, 3                     # bound (4 - 1) * (3 - 1) + 1 = 7
    d.shuffle_buffer = 6
    assert "data.shuffle_buffer=6" in shuffle_buffer_advice(d) and "raise data.shuffle_buffer to 7" in shuffle_buffer_advice(d)
    d.shuffle_buffer = 7
    assert shuffle_buffer_advice(d) is None
    d.shuffle_buffer, d.samples_per_read = 1, 1                 # one sample per read: nothing to keep apart
    assert shuffle_buffer_advice(d) is None

