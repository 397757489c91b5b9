"""Shared test fixtures."""
import os
import signal

import pytest
import torch

TINY_CAPTIONS = ["a photo of a red circle", "two blue squares", "a green star left of a yellow cross",
                 "Generate an image of 64x64 according to the following prompt:"] * 20


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for tiny models: on a shared 2-core machine, two OpenMP threads waiting on
    each other make small ops many times slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random tiny model + tiny codec + small tokenizer, saved in our checkpoint layout."""
    from model import ModelConfig, Transformer
    from sequence import train_tokenizer
    from vq import MoVQGAN, VQConfig
    folder = tmp_path_factory.mktemp("tiny_ckpt")
    tokenizer = train_tokenizer(TINY_CAPTIONS, str(folder / "tokenizer.json"), vocab_size=300)
    torch.manual_seed(0)
    codec = MoVQGAN(VQConfig.from_name("tiny"))
    codec.save_pretrained(folder)
    torch.manual_seed(1)
    Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size + codec.config.n_embed,
                                      max_seq_len=512)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_system(tiny_ckpt):
    """sample.load_system(tiny_ckpt): one copy for every test that samples from the tiny model."""
    from sample import load_system
    return load_system(tiny_ckpt)


@pytest.fixture(scope="session", autouse=True)
def started_early(request, tmp_path_factory):
    """Real processes that the selected test files need, started before the first test: a test module may
    define start_early(folder) -> subprocess.Popen (in a session of its own). A new interpreter spends ~5 s
    importing torch before it does anything; started here, that and the run itself go on beside the
    in-process tests (2 cores: ~1 min off the suite). {module name: (folder, process)}; what is still
    running at the end is killed."""
    started = {}
    for module in dict.fromkeys(getattr(item, "module", None) for item in request.session.items):
        if hasattr(module, "start_early"):
            folder = tmp_path_factory.mktemp(module.__name__)
            started[module.__name__] = folder, module.start_early(folder)
    yield started
    for _, process in started.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
