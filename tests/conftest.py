"""Session fixtures: tiny checkpoints and a small synthetic run, built once per test session."""
import pytest

from tests.helpers import IMAGE_TOKEN, save_hf, tiny_hf_config, tiny_tokenizer


@pytest.fixture(scope="session")
def pg1_dir(tmp_path_factory):
    return save_hf(tiny_hf_config("gemma"), tmp_path_factory.mktemp("pg1"))


@pytest.fixture(scope="session")
def pg2_dir(tmp_path_factory):
    return save_hf(tiny_hf_config("gemma2"), tmp_path_factory.mktemp("pg2"))


@pytest.fixture(scope="session")
def pg1_tok_dir(tmp_path_factory):
    """Tiny PaliGemma 1 checkpoint (224 px would be slow: 16 px, 16 image tokens) with a tokenizer."""
    folder = tmp_path_factory.mktemp("pg1tok")
    from paligemma.tokenizer import Tokenizer
    tok = Tokenizer(tiny_tokenizer(folder))
    assert tok.image_id == IMAGE_TOKEN
    return save_hf(tiny_hf_config("gemma"), folder)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A small synthetic set and checkpoint shared by the train.py and evaluate.py tests."""
    from paligemma.captioning.data import load_examples
    from paligemma.captioning.synthetic import make_checkpoint, make_dataset
    root = tmp_path_factory.mktemp("run")
    data = make_dataset(root / "data", n_train=64, n_val=16, n_test=8, size=64)
    examples, _ = load_examples(data, "train")
    model = make_checkpoint(root / "model", [c for e in examples for c in e.captions], vocab_size=300)
    return str(model), str(data)


@pytest.fixture(scope="session")
def task_tok_dir(tmp_path_factory):
    """A random tiny PaliGemma (64 px, 64 image tokens) whose tokenizer has the 1024 <loc> and 128 <seg>
    tokens as single pieces: for the detect and segment paths of the commands (tests force its tokens)."""
    from paligemma.captioning.synthetic import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("tasktok"), ["a plane and a ship", "two tanks on grass", "roof"],
                           prompt="detect plane ; ship", vocab_size=300, task_tokens=True)
