import pytest

from cluster.config import CONFIG_DIR, Config, ConfigError, flatten, load_config


def test_default_is_the_tiny_cpu_config():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.image.hr_size, cfg.image.lr_size, cfg.image.prompt_size, cfg.image.patch_px) == (64, 16, 64, 16)
    assert cfg.vq.codebook_size == 16384 and cfg.vq.codebook_dim == 8


def test_paper_defaults_without_yaml():
    cfg = load_config(default=False)
    assert (cfg.image.hr_size, cfg.image.lr_size, cfg.image.prompt_size) == (512, 128, 512)
    assert cfg.vq.block_out_channels == [128, 256, 256, 512]


def test_the_default_yaml_validates():
    assert (CONFIG_DIR / "tiny-cpu.yaml").is_file()
    load_config(CONFIG_DIR / "tiny-cpu.yaml")


def test_overrides_apply():
    cfg = load_config(overrides=["image.hr_size=256", "degradation.thresholds.blur_sigma=[1,2,3]"])
    assert cfg.image.hr_size == 256
    assert cfg.degradation.thresholds.blur_sigma == [1, 2, 3]


@pytest.mark.parametrize("override,key", [
    ("image.hr_sise=256", "image.hr_sise"),                                     # unknown key
    ("image.hr_size=big", "image.hr_size"),                                     # wrong type
    ("image.hr_size=200", "image.hr_size"),                                     # not a multiple of 128
    ("degradation.thresholds.blur_sigma=[3,2,1]", "degradation.thresholds.blur_sigma"),
    ("degradation.thresholds.jpeg_quality=[40,60,80]", "degradation.thresholds.jpeg_quality"),
    ("degradation.thresholds.measure=visible", "degradation.thresholds.measure"),
    ("degradation.thresholds.lr_noise_rms=[9,6,12]", "degradation.thresholds.lr_noise_rms"),
    ("degradation.first.blur.kernel_types=[iso,box]", "degradation.first.blur.kernel_types"),
    ("degradation.second.jpeg_prob=1.5", "degradation.second.jpeg_prob"),
    ("policy.dtype=int8", "policy.dtype"),
    ("policy.model.num_attention_heads=4", "policy.model"),                   # head_dim 16
    ("vq.norm_num_groups=7", "vq.norm_num_groups"),
    ("data.input_dir=/no/such/folder", "data.input_dir"),
    ("envs.iqa_python=/no/python", "envs.iqa_python"),
    ("vq.weights=latest", "vq.weights"),
    ("policy.conversation.preset=chatml", "policy.conversation.preset"),
    ("policy.conversation.instruction=no image here", "policy.conversation"),
    ("learner.save_shard_mb=0", "learner.save_shard_mb"),
    ("learner.grpo.advantage=ppo", "learner.grpo.advantage"),
    ("learner.grpo.normalise=sum", "learner.grpo.normalise"),
    ("learner.grpo.policy_loss=dpo", "learner.grpo.policy_loss"),
    ("rollout.group_size=1", "rollout.group_size"),                          # every advantage would be 0
    ("rollout.resources.CPU=2", "rollout.resources"),                       # CPUs have their own key
    ("learner.resources.trainer_node=0", "learner.resources"),
    ("rollout.max_workers=-1", "rollout.max_workers"),
    ("trainer.weight_sync_timeout_s=0", "trainer"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert key in str(err.value)


def test_bad_yaml_key_names_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text("image:\n  hr_size: 128\n  colour: red\n")
    with pytest.raises(ConfigError, match="image.colour"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["image.hr_size"])


def test_flatten_for_tracking():
    flat = flatten(load_config())
    assert flat["image.hr_size"] == 64
    assert flat["degradation.thresholds.noise_std"] == [6.0, 15.0, 25.0]


def test_published_iqa_preset_without_weights_fails_before_start(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["rewards.generation.preset=published", f"rewards.generation.weights_dir={tmp_path}"])
    msg = str(err.value)
    assert "topiq_nr" in msg and str(tmp_path / "topiq_nr.pth") in msg
    # with every metric file present, only CLIP's RN50 is still missing
    for name in ("topiq_nr", "musiq", "maniqa-pipal", "clipiqa"):
        (tmp_path / f"{name}.pth").write_bytes(b"x")
    with pytest.raises(ConfigError, match="RN50.pt"):
        load_config(overrides=["rewards.generation.preset=published", f"rewards.generation.weights_dir={tmp_path}"])


@pytest.mark.parametrize("override,key", [
    ("rewards.understanding_mode=fuzzy", "rewards.understanding_mode"),
    ("rewards.generation.aggregate=max", "rewards.generation.aggregate"),
    ("rewards.generation.fidelity.metric=lpips", "rewards.generation.fidelity.metric"),
    ("rewards.weights.format=-1", "rewards.weights.format"),
    ("vq_train.crop=60", "vq_train.crop"),
    ("vq_train.scales=[1.0,1.5]", "vq_train.scales"),
    ("vq_train.quantised_steps=0", "vq_train"),
])
def test_bad_reward_and_vq_train_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


@pytest.mark.parametrize("overrides,key", [
    (["infer.mode=crop"], "infer.mode"),
    (["infer.tile_overlap=32"], "infer.tile_overlap"),  # not smaller than the 32-px tile
    (["eval.metrics=[psnr,kid]"], "eval.metrics"),
    (["eval.num_workers=-1"], "eval"),
])
def test_bad_infer_and_eval_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=overrides)


def stand_in_files(tmp_path):
    """Overrides pointing configs/pure-7b*.yaml at empty stand-ins of the files they name."""
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "config.json").write_text('{"architectures": ["ChameleonForConditionalGeneration"], '
                                                     '"max_position_embeddings": 11776}')
    (tmp_path / "vq.pt").write_bytes(b"")
    (tmp_path / "hq").mkdir()
    iqa = tmp_path / "iqa"
    (iqa / "clip").mkdir(parents=True)
    for name in ("topiq_nr", "musiq", "maniqa-pipal", "clipiqa"):
        (iqa / f"{name}.pth").write_bytes(b"")
    (iqa / "clip" / "RN50.pt").write_bytes(b"")
    return [f"vq.checkpoint={tmp_path / 'vq.pt'}", f"policy.checkpoint={tmp_path / 'policy'}",
            f"data.input_dir={tmp_path / 'hq'}", f"rewards.generation.weights_dir={iqa}"]


def gpus(cfg):
    return cfg.learner.num_workers * cfg.learner.num_gpus + cfg.rollout.num_workers * cfg.rollout.gpus_per_worker \
        + cfg.rewards.num_workers * cfg.rewards.num_gpus


def test_gpu_cluster_config_validates_when_its_files_exist(tmp_path):
    """configs/pure-7b.yaml names local checkpoints; with stand-in files at those paths it
    validates, and without them it fails naming the first missing one."""
    with pytest.raises(ConfigError, match="vq.checkpoint"):
        load_config(CONFIG_DIR / "pure-7b.yaml")
    cfg = load_config(CONFIG_DIR / "pure-7b.yaml", stand_in_files(tmp_path))
    assert cfg.learner.zero_stage == 3 and cfg.learner.num_workers == 4
    assert cfg.policy.conversation.preset == "lumina" and cfg.rollout.max_model_len == 11776
    assert gpus(cfg) == 8
    assert (cfg.trainer.prompts_per_step * cfg.rollout.group_size) % cfg.learner.num_workers == 0


def test_published_run_preset_is_pure_7b_with_the_released_decoding_and_schedule(tmp_path):
    from learner.schedule import lr_at

    cfg = load_config(CONFIG_DIR / "pure-7b-published.yaml", stand_in_files(tmp_path))
    (tmp_path / "b").mkdir()
    base = load_config(CONFIG_DIR / "pure-7b.yaml", stand_in_files(tmp_path / "b"))
    assert cfg.trainer.mode == "sync" and (cfg.trainer.prompts_per_step, cfg.rollout.group_size) == (6, 5)
    s = cfg.rollout.sampling
    assert (s.cfg_scale, s.text_greedy, cfg.rollout.engine) == (0.8, True, "vllm")  # CFG on the fast path
    assert cfg.learner.grpo.adv_eps == 1e-4 and cfg.trainer.steps == 200 and gpus(cfg) == 8
    rates = [lr_at(k, cfg.learner.schedule, cfg.trainer.steps, cfg.learner.lr) for k in (1, 30, 31, 200)]
    assert rates == pytest.approx([5e-6, 0.0, 2e-6, 0.0])
    assert 30 % cfg.learner.num_workers == 0
    # everything it does not change comes from its base
    assert cfg.policy.conversation.preset == base.policy.conversation.preset == "lumina"
    assert cfg.learner.zero_stage == base.learner.zero_stage and cfg.rewards.weights == base.rewards.weights
    assert cfg.rewards.generation.preset == base.rewards.generation.preset == "published"


def test_a_yaml_base_chain_that_is_missing_or_circular_is_a_clear_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 3\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*b\.yaml \(the base of .*a\.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="name each other as base"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("seed: 1\ntrainer: {steps: 4}\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert cfg.seed == 3 and cfg.trainer.steps == 4  # the file wins over its base


@pytest.mark.parametrize("overrides,key,fix", [
    (["rollout.gpus_per_worker=0.5"], "rollout.gpus_per_worker", "trainer.weight_sync=filesystem"),
    (["learner.num_gpus=0.5"], "learner.num_gpus", "use 1"),
    (["rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size", "use 1 and scale with rollout.num_workers"),
])
def test_nccl_on_shared_gpus_and_tensor_parallel_are_refused_with_the_fix(overrides, key, fix):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert key in str(err.value) and fix in str(err.value)
    load_config(overrides=["rollout.gpus_per_worker=1", "learner.num_gpus=1"])  # whole GPUs are fine
    # one learner rank and a weight sync without a process group may share a GPU with a worker
    load_config(overrides=["rollout.gpus_per_worker=0.4", "learner.num_gpus=0.5", "learner.num_workers=1",
                           "trainer.weight_sync=filesystem"])


def test_conversation_presets_resolve_with_overrides():
    from vlcot.conversation import ConversationConfig, resolve_conversation

    assert resolve_conversation(ConversationConfig()).name == "realsr"  # no checkpoint preference
    assert resolve_conversation(ConversationConfig(), "lumina").end_token == "<reserved08706>"
    conv = resolve_conversation(ConversationConfig(preset="lumina", end_token="</s>"), "realsr")
    assert (conv.name, conv.turn_separator, conv.end_token) == ("lumina", "<reserved08706>", "</s>")
    assert conv.instruction.startswith("Perceive the degradation, understand the image content")


# three packages' problems in one config: vlcot's image sizes, the learner's, rollout's
THREE_PACKAGES = {"image.prompt_size": "image.prompt_size=72", "learner.zero_stage": "learner.zero_stage=1",
                  "rollout.engine": "rollout.engine=tgi"}


def test_every_problem_of_a_config_is_reported_at_once():
    """Problems in three packages and one cross-role check come back in one error, one line
    each naming its full key, not the first alone."""
    cross = "rollout.gpus_per_worker"  # a fraction of a GPU in the NCCL weight group
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[*THREE_PACKAGES.values(), f"{cross}=0.5"])
    lines = str(err.value).splitlines()
    assert lines[0] == "4 config problems:"
    assert [line.split("'")[1] for line in lines[1:]] == [*THREE_PACKAGES, cross]
    assert all(line.startswith("  config key '") for line in lines[1:])
    assert sorted(key for key, _ in err.value.problems) == sorted([*THREE_PACKAGES, cross])
    assert "got 72" in lines[1] and "'tgi' not in" in lines[3]


def test_the_cli_prints_every_problem_of_a_config_on_its_own_line(capsys):
    from app.cli import main

    assert main(["show-config", *THREE_PACKAGES.values()]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert lines[0] == "realsr-r1 show-config: 3 config problems:"
    assert [line.split("'")[1] for line in lines[1:]] == list(THREE_PACKAGES)


@pytest.mark.parametrize("overrides,keys", [
    (["image.patch_px=0"], ["image.patch_px"]),               # the checks that divide by it are skipped
    (["vq.norm_num_groups=0"], ["vq.norm_num_groups"]),
    (["policy.model.num_attention_heads=0"], ["policy.model"]),
    (["learner.num_workers=0"], ["learner.num_workers"]),    # samples over ranks is not computed
    (["degradation.first.blur.kernel_types=[]", "degradation.first.blur.kernel_probs=[]"],
     ["degradation.first.blur.kernel_types", "degradation.first.blur.kernel_probs"]),  # min() of no weights
])
def test_a_value_later_checks_divide_by_is_reported_not_a_crash(overrides, keys):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert [k for k, _ in err.value.problems] == keys
