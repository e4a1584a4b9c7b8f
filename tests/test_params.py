import pytest

from oar_core.params import IngestParams, ParamsError, TokenizerParams, load_params, load_section


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_empty_file_gives_defaults(tmp_path):
    p = load_section("ingest", write(tmp_path, ""))
    assert isinstance(p, IngestParams) and p.source == "/usr/share/datasets/fashion-mnist" and p.image_size == 28


def test_section_values_are_read(tmp_path):
    p = load_section("tokenizer", write(tmp_path, "tokenizer:\n  grid: 14\n  steps: 10\n"))
    assert isinstance(p, TokenizerParams) and (p.grid, p.steps) == (14, 10)


def test_unknown_key_reported_with_dotted_path(tmp_path):
    path = write(tmp_path, "train_raster:\n  model:\n    n_layr: 3\n")
    with pytest.raises(ParamsError) as e:
        load_params(path)
    msg = str(e.value)
    assert "train_raster.model.n_layr" in msg and "unknown key" in msg and str(path) in msg


def test_unknown_section_reported(tmp_path):
    with pytest.raises(ParamsError, match=r"tokeniser: unknown key"):
        load_params(write(tmp_path, "tokeniser:\n  grid: 7\n"))


def test_bad_value_named_with_input(tmp_path):
    with pytest.raises(ParamsError) as e:
        load_section("ingest", write(tmp_path, "ingest:\n  image_size: 3\n  channels: 2\n"))
    msg = str(e.value)
    assert "ingest.image_size" in msg and "got 3" in msg
    assert "ingest.channels" in msg and "got 2" in msg
    assert "2 problem(s)" in msg


def test_typo_in_another_section_still_caught(tmp_path):
    # every stage validates the whole file, so a typo cannot hide in a section nobody reads yet
    with pytest.raises(ParamsError, match="sample.temprature"):
        load_section("ingest", write(tmp_path, "sample:\n  temprature: 0.5\n"))


def test_cross_field_rule(tmp_path):
    with pytest.raises(ParamsError, match="divisible"):
        load_params(write(tmp_path, "train_random:\n  model:\n    d_model: 100\n    n_head: 3\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not found.*--params"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "ingest: [unclosed\n"))
    with pytest.raises(ParamsError, match="mapping"):
        load_params(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("module", ["pipeline.ingest", "pipeline.tokenizer", "pipeline.tokenize"])
def test_scripts_print_one_line_error_and_exit_1(tmp_path, capsys, module):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(["--params", str(write(tmp_path, "ingest:\n  image_sise: 28\n"))])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ingest.image_sise" in err


@pytest.mark.parametrize("text,key", [
    ("extract_orders:\n  splits: []\n", "extract_orders.splits"),
    ("extract_orders:\n  splits: [test]\n", "extract_orders.splits.*must include 'train'"),
    ("sample:\n  n_per_model: 3\n", "sample.n_per_model"),
    ("ingest:\n  source: fashion-mnist\n", "ingest.source.*/usr/share/datasets/fashion-mnist"),
    ("ingest:\n  image_size: 30\n", r"ingest.image_size \(30\) must be tokenizer.grid \(7\) times a power of 2"),
    ("sample:\n  models: []\n", "sample.models"),
    ("sample:\n  models:\n  - {name: a, checkpoint: x, order: confidence, location: {score: gt_prob}}\n",
     "sample.models.0.location: score 'gt_prob' reads the ground truth"),  # a sampler cannot look at the answer
    ("sample:\n  models:\n  - {name: a, checkpoint: x, order: policy, location: {anneal: sideways}}\n",
     "sample.models.0.location.anneal"),
    ("sample:\n  models:\n  - {name: a, checkpoint: x, order: policy, steps: 0}\n", "sample.models.0.steps"),
    ("sample:\n  models:\n  - {name: a, checkpoint: x, order: raster, steps: 4, schedule: square}\n",
     "sample.models.0.schedule"),  # parallel decoding: constant, linear, cosine or arccos
])
def test_sampling_and_extraction_lists_and_rules_are_checked(tmp_path, text, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.").replace(r"\.*", ".*")):
        load_params(write(tmp_path, text))


def test_policy_head_needs_extracted_orders(tmp_path):
    with pytest.raises(ParamsError, match="policy_weight > 0 needs order='given'"):
        load_params(write(tmp_path, "train_random:\n  policy_weight: 1.0\n"))


def test_random_mix_anneals_linearly_over_the_steps():
    import torch

    from oar_core.params import TrainParams
    from pipeline.train import OrderSource

    p = TrainParams(order="given", steps=101, random_mix=0.8, random_mix_end=0.0)
    src = OrderSource(p, 2, 2, torch.arange(4).expand(1000, -1))
    assert [src.mix_at(s) for s in (0, 50, 100)] == pytest.approx([0.8, 0.4, 0.0])
    g = torch.Generator().manual_seed(0)
    early, late = (1 - src(torch.arange(1000), g, s)[1].float().mean() for s in (0, 100))
    assert 0.75 < early < 0.85 and late == 0  # fraction of rows given a random order instead of the extracted one


# ---------------------------------------------------------------------------------------------- issue 21
@pytest.mark.parametrize("text,says", [
    # accepted before: training exited 0 with NaN weights / sampling ended in a traceback from multinomial
    ("train_random:\n  lr: .inf\n", "train_random.lr: Input should be a finite number (got inf)"),
    ("sample:\n  cfg_scale: .inf\n", "sample.cfg_scale: Input should be a finite number (got inf)"),
    ("ingest:\n  test_fraction: .nan\n", "ingest.test_fraction: Input should be a finite number (got nan)"),
    ("train_raster:\n  model:\n    mlp_ratio: .inf\n", "train_raster.model.mlp_ratio: Input should be a finite number"),
    ("finetune:\n  random_mix_end: .nan\n", "finetune.random_mix_end: Input should be a finite number"),
    ("ingest:\n  s3_timeout_s: 1.0e+400\n", "ingest.s3_timeout_s: Input should be a finite number (got inf)"),
    # a 19.6 GB allocation and a traceback before
    ("train_random:\n  batch_size: 100000000\n",
     "train_random.batch_size: Input should be less than or equal to 65536 (got 100000000)"),
    ("evaluate:\n  nll_batch_size: 100000000\n",
     "evaluate.nll_batch_size: Input should be less than or equal to 65536"),
    # "Overflow when unpacking long long" from torch, without the key, before
    ("train_random:\n  seed: 1180591620717411303424\n",
     "train_random.seed: Input should be less than or equal to 4294967295 (got 1180591620717411303424)"),
    ("evaluate:\n  seed: -1\n", "evaluate.seed: Input should be greater than or equal to 0 (got -1)"),
    ("sample:\n  temperature: 1e-40\n", "sample.temperature: Input should be greater than or equal to 0.0001"),
    ("sample:\n  cfg_scale: 1e30\n", "sample.cfg_scale: Input should be less than or equal to 100"),
    ("evaluate:\n  strip_steps: 1000000000\n", "evaluate.strip_steps: Input should be less than or equal to 256"),
])
def test_non_finite_and_absurd_values_are_refused_with_their_key(tmp_path, text, says):
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, text))
    assert says in str(e.value)


def test_the_default_params_yaml_is_accepted():
    from pathlib import Path

    load_params(Path(__file__).parents[1] / "params.yaml")


def test_duplicate_keys_are_refused_with_their_lines(tmp_path):
    # PyYAML took the last value while DVC refused the file: `python -m pipeline.*` and `dvc repro` disagreed
    text = ("ingest:\n  out_dir: a\n  seed: 1\n  out_dir: b\ntrain_random:\n  model: {d_model: 64, d_model: 32}\n"
            "  lr: 0.1\n  lr: 0.2\n  lr: 0.3\ningest:\n  seed: 2\n")
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'params.yaml'}: duplicate keys, which DVC refuses")
    for where in ("ingest.out_dir (lines 2, 4)", "train_random.model.d_model (lines 6, 6)",
                  "train_random.lr (lines 7, 8, 9)", "ingest (lines 1, 10)"):
        assert where in msg
    # the same key under different parents, or a list of mappings with the same keys, is no duplicate
    load_params(write(tmp_path, "train_raster:\n  lr: 0.1\ntrain_random:\n  lr: 0.1\nsample:\n  models:\n"
                                "  - {name: a, checkpoint: x, order: raster}\n"
                                "  - {name: b, checkpoint: x, order: raster}\n"))


def test_yaml_bomb_and_aliases_are_refused_at_once(tmp_path):
    import time

    # "billion laughs": 9 levels of 9 aliases each, 9**9 strings once expanded
    lines = ['l0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    t0 = time.time()
    with pytest.raises(ParamsError, match=r"params.yaml: line 1: YAML anchors and aliases \(&a0\) are not allowed"):
        load_params(write(tmp_path, "\n".join(lines) + "\ningest:\n  source: *a9\n"))
    assert time.time() - t0 < 2
    # a merge key needs an alias, and is refused the same way
    with pytest.raises(ParamsError, match=r"line 3: YAML anchors and aliases \(&base\)"):
        load_params(write(tmp_path, "ingest:\n  seed: 1\ntrain_raster: &base\n  lr: 0.1\n"
                                    "train_random:\n  <<: *base\n"))
    with pytest.raises(ParamsError, match=r"line 2: YAML anchors and aliases \(\*x\)"):
        load_params(write(tmp_path, "ingest:\n  source: *x\n"))


def test_quoted_values_are_cut_to_80_characters(tmp_path):
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, "ingest:\n  image_size: " + "x" * 100_000 + "\n  max_train: [" +
                          ",".join(["[1,2,3,4,5,6,7,8]"] * 1000) + "]\n"))
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 2 and all(len(ln) < 200 for ln in lines), lines
    assert lines[0].strip().startswith("ingest.image_size: Input should be a valid integer")
    assert "(got 'xxxxxxxx" in lines[0]
    assert all(ln.endswith("…)") for ln in lines)


def test_an_integer_too_long_to_read_names_its_line(tmp_path):
    with pytest.raises(ParamsError, match=r"params.yaml: line 3: an integer of 5000 digits is no usable value"):
        load_params(write(tmp_path, "ingest:\n  seed: 1\n  max_train: " + "9" * 5000 + "\n"))


def test_broken_yaml_is_one_line_with_its_position(tmp_path):
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, "ingest:\n  source: [unclosed\n"))
    assert str(e.value) == (f"{tmp_path / 'params.yaml'}: not valid YAML at line 3, column 1: expected ',' or ']', "
                            f"but got '<stream end>' (while parsing a flow sequence from line 2)")
    (tmp_path / "params.yaml").write_bytes(b"ingest:\n  source: caf\xe9\n")  # not UTF-8
    with pytest.raises(ParamsError, match=r"not valid YAML: .*invalid continuation byte.*position 21"):
        load_params(tmp_path / "params.yaml")


def test_dag_reads_params_yaml_as_strictly(tmp_path):
    from oar_core.dag import dag_stages

    (tmp_path / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: x\n    outs: [${ingest.out_dir}]\n")
    write(tmp_path, "ingest:\n  out_dir: a\n  out_dir: b\n")
    with pytest.raises(ValueError, match=r"duplicate keys.*ingest.out_dir \(lines 2, 3\)"):
        dag_stages(tmp_path / "dvc.yaml")
    # a stage fills ${...} from its validated params (defaults included), not from a second read of the file
    assert dag_stages(tmp_path / "dvc.yaml", {"ingest": {"out_dir": "c"}})["ingest"]["outs"] == ["c"]
    write(tmp_path, "tokenizer:\n  steps: 5\n")  # read as written, a key left out is named (not KeyError: 'ingest')
    with pytest.raises(ValueError, match=r"dvc.yaml: \$\{ingest.out_dir\} is not set in params.yaml"):
        dag_stages(tmp_path / "dvc.yaml")


def test_prefect_write_params_round_trips_through_the_strict_reader(tmp_path):
    """flows.pipeline.write_params edits params.yaml with ruamel and re-reads it with load_params: its output
    must pass the duplicate-key and alias checks, and a file that fails them is refused before it is touched."""
    import shutil
    from pathlib import Path

    from flows.pipeline import write_params
    from oar_core.params import ModelParams

    shutil.copy(Path(__file__).parents[1] / "params.yaml", tmp_path / "params.yaml")
    current = load_params(tmp_path / "params.yaml")
    model = ModelParams(n_layer=2, n_head=2, d_model=64)  # the same object into two sections
    changed = write_params(tmp_path, {s: getattr(current, s).model_copy(update={"model": model, "seed": 7})
                                      for s in ("train_raster", "train_random")})
    assert set(changed) >= {"train_raster.model.n_layer", "train_random.seed"}
    text = (tmp_path / "params.yaml").read_text()
    assert "&id0" not in text  # ruamel would name an anchor for a repeated object &id001
    again = load_params(tmp_path / "params.yaml")
    assert again.train_raster.model == again.train_random.model == model and again.train_random.seed == 7

    bad = text.replace("train_random:\n", "train_random:\n  seed: 3\n", 1)
    (tmp_path / "params.yaml").write_text(bad)
    with pytest.raises(ParamsError, match=r"duplicate keys.*train_random.seed"):
        write_params(tmp_path, {"ingest": current.ingest.model_copy(update={"seed": 5})})
    assert (tmp_path / "params.yaml").read_text() == bad
