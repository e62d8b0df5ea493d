"""`model.pooling: mean`: the classifier reads the masked mean of the final hidden states."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from gpart_cli.adapters.pooling import MaskedMeanPooler, apply_pooling, recorded_pooling
from gpart_cli.errors import GpartError
from tests.conftest import tiny_roberta


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def test_mean_pooling_feeds_the_classifier_the_masked_mean():
    model = tiny_bert()
    keys = list(model.state_dict())
    apply_pooling(model, "mean")
    assert isinstance(model.bert.pooler, MaskedMeanPooler) and recorded_pooling(model) == "mean"
    assert list(model.state_dict()) == keys  # saving and loading see the same tensors as before
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        hidden = model.bert(ids, attention_mask=mask).last_hidden_state               # (2, 5, 32)
        expected = torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0)])            # real tokens only
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, model.classifier(expected), rtol=0, atol=1e-6)


def test_padding_does_not_change_a_mean_pooled_prediction():
    model = apply_pooling(tiny_bert(), "mean")
    with torch.no_grad():
        short = model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
        padded = model(input_ids=torch.tensor([[5, 6, 7, 0, 0, 0]]),
                       attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0]])).logits
    torch.testing.assert_close(short, padded, rtol=0, atol=1e-6)


def test_cls_pooling_leaves_the_model_alone():
    model = tiny_bert()
    pooler = model.bert.pooler
    assert apply_pooling(model, "cls") is model and model.bert.pooler is pooler and recorded_pooling(model) == "cls"
    assert apply_pooling(model, None) is model


def test_mean_pooling_errors_name_the_field():
    with pytest.raises(GpartError, match="model.pooling: mean needs an encoder whose classifier reads a pooler"):
        apply_pooling(tiny_roberta(), "mean")  # RoBERTa's classification head reads <s> directly
    with pytest.raises(GpartError, match="model.pooling 'max' is not one of cls, mean"):
        apply_pooling(tiny_bert(), "max")
