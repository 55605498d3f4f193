import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GLUE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "glue")


def tiny_bert(num_labels=3, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=90, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg).eval()


def tiny_sequential(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Tanh(), torch.nn.Linear(12, 3)
    ).eval()


@pytest.fixture
def bert_batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 120, (8, 10), generator=g), "labels": torch.randint(0, 3, (8,), generator=g)}


@pytest.fixture
def glue_dir():
    path = os.path.abspath(GLUE_DIR)
    if not os.path.isdir(path):
        pytest.skip(f"GLUE data not found at {path}")
    return path


def clone(model):
    return copy.deepcopy(model)
