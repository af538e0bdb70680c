"""From a run's configuration to what ``rosafx.fit`` takes: the model with its task head and
adapters, the tokenizer, the batches, the loss and the metrics. ``rosafx train``,
``evaluate`` and ``export`` share it, so a RUN is rebuilt exactly as it was trained."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from rosafx.recipes.data import Batches, TaskMetrics, best_metric_of, encode, examples_from, loss_for, model_inputs, read_table
from rosafx.recipes.data.examples import Examples
from rosafx.recipes.data.instructions import truncation_note
from rosafx.recipes.data.packing import PackedBatches, check_keeps_examples_apart, packed_batch
from rosafx.errors import RosafxError
from rosafx.io.reading import check_regular_file, read_json_or_yaml
from rosafx.recipes import options
from rosafx.recipes.heads import new_head_paths, open_task_model
from rosafx.recipes.loading import ModelSource, check_hf_weights, hf_config, identify, read_source
from rosafx.recipes.rule_flags import build_rules

# Every key `rosafx train` takes (flags, --config file, run.json), with its default: rosafx/recipes/options.py.
DEFAULTS = options.DEFAULTS
# Keys a resumed run may change: where it runs, not what it computes.
RESUMABLE_WITH_OTHER = ("device",)
SOURCE_JSON, ADAPTER_JSON = "source.json", "rosafx.json"
CONFIG_FILE = "a --config options file"
DATA_FILE = "a data file: .tsv, .csv, .jsonl or .txt"
INPUT_FILES = {"data": f"--data: {DATA_FILE}", "eval": f"--eval: {DATA_FILE}", "rules": "--rules: a JSON rules file"}


def read_config_file(path) -> dict:
    """A --config file's options, each checked against the options table."""
    raw = read_json_or_yaml(path, CONFIG_FILE, dict)
    names = {}
    for key in raw:
        if not isinstance(key, str):
            raise RosafxError(f"{path}: option names are texts, got {key!r}. Known: {sorted(DEFAULTS)}.")
        names[key.replace("-", "_")] = raw[key]
    return options.checked(names, where=str(path))


def resolve(flags: dict, config_file=None, run_config: dict | None = None) -> dict:
    """Defaults < a run's recorded options (``run_config``, resuming) < the config file < flags
    given on the command line (not None). Every value is checked against the options table."""
    config = dict(DEFAULTS)
    if run_config is not None:
        config.update(options.checked(run_config, where="run.json"))
    if config_file is not None:
        config.update(read_config_file(config_file))
    config.update(options.checked({k: v for k, v in flags.items() if v is not None}))
    if config["model"] is None or config["data"] is None:
        raise RosafxError("rosafx train needs MODEL and --data (on the command line or in --config).")
    for key, what in INPUT_FILES.items():  # before the model is opened: a FIFO or a directory, said as such
        if config[key] is not None:
            check_regular_file(config[key], what)
    for key in ("model", "data", "eval", "rules"):
        if config[key] is not None:
            config[key] = str(Path(config[key]).resolve())
    return config


def training_device(name, here) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``. Under torchrun the
    process group decides: nccl ranks train on their own GPU, gloo ranks on the CPU."""
    if not isinstance(name, str) or not (name in ("auto", "cpu", "cuda") or name.startswith("cuda:")):
        raise RosafxError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}.")
    if here.size > 1:
        return here.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not torch.cuda.is_available():
        raise RosafxError(f"--device {name}: this machine has no CUDA device torch can use "
                          f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of torch.")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RosafxError(f"--device {name}: {exc}") from exc
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RosafxError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s).")
    return device


def on_device(adapted, device: torch.device):
    """The adapted model moved to ``device`` (built on the CPU, where capture is checked);
    on a GPU its adapter ops are lowered to the Triton kernels."""
    if device.type == "cpu":
        return adapted
    import rosafx
    return rosafx.lower(rosafx.to_device(adapted, device), backend="auto")


@dataclasses.dataclass
class ModelSpec:
    """Where the base model comes from, and an adapter to continue from (`rosafx adapt` output)."""
    source: ModelSource
    adapter_dir: Path | None


def model_spec(model_path) -> ModelSpec:
    path = Path(model_path)
    if path.is_dir() and (path / ADAPTER_JSON).exists():
        if not (path / SOURCE_JSON).exists():
            raise RosafxError(f"{path} is an adapter directory without {SOURCE_JSON}: pass the base model instead.")
        return ModelSpec(read_source(path), path)  # validated: source.json is untrusted input
    return ModelSpec(identify(path), None)


def open_tokenizer(source: ModelSource):
    if source.kind != "hf":
        raise RosafxError(f"{source.path} is a {source.kind} file: training on text needs a Hugging Face model "
                          "directory (its tokenizer and config). Export the HF model directory instead.")
    directory = Path(source.path)
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # a damaged or foreign tokenizer file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RosafxError(f"Cannot load the tokenizer in {directory}: {first}. Save it again with "
                          "tokenizer.save_pretrained(DIR).") from exc
    special = len(set(tokenizer.all_special_tokens))
    if len(tokenizer) <= special:
        # without its files AutoTokenizer builds one of the special tokens alone (5 for BERT): every word unknown
        raise RosafxError(f"{directory} has no tokenizer files with a vocabulary (its tokenizer holds only its "
                          f"{special} special tokens): save the model's tokenizer there with "
                          "tokenizer.save_pretrained(DIR).")
    config = hf_config(directory)
    embedded = getattr(config, "vocab_size", None)
    if isinstance(embedded, int) and len(tokenizer) > embedded:
        raise RosafxError(f"The tokenizer in {directory} has {len(tokenizer)} tokens, but the model embeds "
                          f"{embedded} (vocab_size): they are not a pair. Save the model's own tokenizer there.")
    return only_inputs_the_model_takes(tokenizer, config)


def only_inputs_the_model_takes(tokenizer, config):
    """A tokenizer made for another architecture (a BERT one saved beside a decoder) returns
    ``token_type_ids`` that the model's forward does not name; fed to it, torch.export cannot
    trace the whole model (it is captured in parts) and ONNX export fails. The tokenizer stops
    returning them (``model_input_names``, which HF tokenizers honour) when the architecture's
    base model (``AutoModel``'s class for this config) takes none."""
    if "token_type_ids" not in tokenizer.model_input_names:
        return tokenizer
    import inspect

    import transformers
    try:
        base_class = transformers.AutoModel._model_mapping[type(config)]
    except KeyError:   # an architecture AutoModel does not know: leave the tokenizer as it is
        return tokenizer
    if "token_type_ids" not in inspect.signature(base_class.forward).parameters:
        tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
    return tokenizer


def read_examples(path, config: dict, label_names: list[str] | None = None) -> Examples:
    check_regular_file(path, DATA_FILE)  # a FIFO or a directory is named as such, not "does not exist"
    return examples_from(read_table(path), config["task"], text_column=config["text_column"],
                         pair_column=config["pair_column"], label_column=config["label_column"],
                         label_names=label_names, prompt_column=config.get("prompt_column"),
                         response_column=config.get("response_column"),
                         messages_column=config.get("messages_column"))


def batches_of(examples: Examples, tokenizer, config: dict, cache_dir=None, *, train: bool):
    """``Batches``, or ``PackedBatches`` for a run that packs (its evaluation data is packed too:
    each example's loss is the same either way, and the captured graph takes packed inputs)."""
    encoded = encode(examples, tokenizer, config["max_length"], cache_dir)
    if config.get("pack"):
        return PackedBatches(encoded, config["batch_size"], config["max_length"], shuffle=train, seed=config["seed"])
    return Batches(encoded, config["batch_size"], shuffle=train, seed=config["seed"])


def data_note(batches, max_length: int) -> str | None:
    """The one line said about instruction rows truncated to fit --max-length, or None."""
    return truncation_note(batches.encoded, max_length) if batches is not None else None


def example_inputs(tokenizer, config: dict, pairs: bool) -> dict:
    """Two tiny padded rows with the same input names as the training batches."""
    sample = Examples(config["task"], ["a b c", "a"], ["d e", "f"] if pairs else None, None, None, {})
    encoded = encode(sample, tokenizer, config["max_length"])
    if config.get("pack"):  # one example a row: two rows, so that the batch dim stays dynamic
        return model_inputs(packed_batch(encoded, [[0], [1]]))
    return model_inputs(Batches(encoded, 2).batch(torch.arange(2)))


def check_packing(config: dict) -> None:
    if not config.get("pack"):
        return
    if config["task"] != "causal-lm":
        raise RosafxError(f"--pack packs causal-lm examples; the {config['task']} task takes one example a row. "
                          "Drop --pack.")
    if config.get("compile"):
        raise RosafxError("--pack with --compile is not supported yet (the compiled step pads 2-D attention masks "
                          "to static shapes; packed rows carry 4-D ones). Drop one of them.")


def check_head(config: dict, spec: ModelSpec, label_names) -> None:
    """Refuse a task that does not fit the model's head before anything is written."""
    from rosafx.recipes.heads import check_task_fits
    if spec.source.kind != "hf":
        return
    check_packing(config)
    model_config, kind = check_task_fits(spec.source.path, config["task"], label_names)
    check_max_length(config["max_length"], model_config, spec.source.path)
    check_hf_weights(spec.source.path)  # no weights, truncated or pickled ones: before RUN is written
    if spec.adapter_dir is not None and kind is None:
        raise RosafxError(f"{spec.adapter_dir} was adapted on {spec.source.path}, which has no {config['task']} "
                          "head; adapt the model with its task head, or train from the base model with --method.")


# Where HF configs keep how many positions the model embeds.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def positions_of(hf_config) -> int | None:
    """How many positions the model embeds, when its config says."""
    for key in POSITION_KEYS:
        positions = getattr(hf_config, key, None)
        if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
            return positions
    return None


def check_max_length(max_length: int, hf_config, model_path) -> None:
    """A longer --max-length than the model has positions fails at the first long batch (or
    indexes past the position table): refuse it before anything is written."""
    for key in POSITION_KEYS:
        positions = getattr(hf_config, key, None)
        if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
            if max_length > positions:
                raise RosafxError(f"--max-length {max_length} is more than the {positions} positions of {model_path} "
                                  f"({key}); use --max-length {positions} or less.")
            return


def build_adapted(config: dict, spec: ModelSpec, label_names, inputs: dict):
    """The task model with its adapters: fresh from the rules, or loaded from `rosafx adapt` output."""
    import rosafx
    torch.manual_seed(config["seed"])  # a new head and the adapters start the same in every rebuild
    module, head_is_new = open_task_model(spec.source.path, config["task"], label_names)
    if config.get("pack"):
        check_keeps_examples_apart(module, spec.source.path)
    quantize = quantization(config.get("quantize"), config.get("quantize_group_size"))
    if spec.adapter_dir is not None:
        return rosafx.load(module, spec.adapter_dir, example_inputs=inputs, quantize=quantize)
    rules = build_rules(config["method"], config["target"], config["rank"], config["alpha"], config["option"],
                        Path(config["rules"]) if config["rules"] else None)
    if head_is_new:
        rules.update({path: {"method": "full"} for path in new_head_paths(module)})
    return rosafx.transform(module, rules, example_inputs=inputs, quantize=quantize)


def quantization(scheme: str | None, group_size: int | None) -> dict | None:
    """--quantize and --quantize-group-size as ``rosafx.transform`` takes them."""
    if scheme is None:
        if group_size is not None:
            raise RosafxError("--quantize-group-size needs --quantize (nf4, int4 or int8).")
        return None
    return {"scheme": scheme, "group_size": group_size}


def task_loss_and_metrics(task: str):
    return loss_for(task), TaskMetrics(task)
