"""Causal-LM data for launch/train.py: plain text, prompt/response pairs and chat `messages`,
tokenised into (input_ids, labels) with labels -100 wherever no loss is taken (prompt tokens,
padding), optional packing, and a token-weighted loss sum for evaluation.

Row formats (JSONL, one object per line; the format is chosen from the first row's keys):
  {"text": "..."}                                    loss on every token
  {"prompt": "...", "response": "..."}               loss on the response and the EOS after it
  {"messages": [{"role": "user", "content": ...},    rendered with the tokenizer's chat template;
                {"role": "assistant", ...}, ...]}    loss on every assistant turn (incl. its end token)
"""
import torch
import torch.nn.functional as F

IGNORE = -100
FORMATS = {"text": ("text",), "prompt_response": ("prompt", "response"), "messages": ("messages",)}


def detect_format(rows):
    """The row format of a causal-LM file from its first row, or None if no format fits."""
    keys = set(rows[0]) if rows else set()
    for name in ("messages", "prompt_response", "text"):   # the most specific first
        if set(FORMATS[name]) <= keys:
            return name
    return None


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_segments(tokenizer, messages):
    """[(text, is_response)] whose concatenation is the rendered conversation: the text added by
    each assistant turn is a response segment, everything between turns is prompt. Relies on each
    rendered prefix of the conversation being a prefix of the next (true of the usual templates)."""
    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(messages[:i], True)
        through = render(messages[:i + 1], False)
        if not before.startswith(done) or not through.startswith(before):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "use prompt/response rows instead of messages")
        segments += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    if not segments:
        raise ValueError("a messages row has no assistant turn (nothing to learn)")
    return segments


def encode_example(tokenizer, row, fmt, max_length):
    """(input_ids, labels) of one row, truncated to max_length; None if no loss token survives."""
    eos = tokenizer.eos_token_id
    if fmt == "text":
        ids = tokenizer(str(row["text"]))["input_ids"]   # with the tokenizer's own BOS/EOS, if any
        if eos is not None and ids[-1:] != [eos]:
            ids.append(eos)
        labels = list(ids)
    else:
        if fmt == "prompt_response":   # the prompt as at inference: with the tokenizer's BOS
            segments = [(str(row["prompt"]), False), (str(row["response"]), True)]
            bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and \
                tokenizer.bos_token_id is not None else []
        else:                          # the template writes its own special tokens
            segments, bos = _chat_segments(tokenizer, row["messages"]), []
        ids, labels = list(bos), [IGNORE] * len(bos)
        for text, is_response in segments:
            piece = _ids(tokenizer, text)
            ids += piece
            labels += piece if is_response else [IGNORE] * len(piece)
        # the model must learn to stop: EOS after the (last) response unless the template ended it
        if eos is not None and eos not in ids[-2:]:
            ids.append(eos)
            labels.append(eos)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels[1:]):   # label 0 is never predicted (no context)
        return None
    return ids, labels


def pack(examples, block):
    """Concatenate (ids, labels) examples into blocks of exactly `block` tokens (the remainder is
    dropped). Attention spans example boundaries (no position reset), as in GPT-style packing."""
    flat_ids, flat_labels, blocks = [], [], []
    for ids, labels in examples:
        flat_ids += ids
        flat_labels += labels
        while len(flat_ids) >= block:
            blocks.append((flat_ids[:block], flat_labels[:block]))
            flat_ids, flat_labels = flat_ids[block:], flat_labels[block:]
    return blocks


def collate(examples, pad_id, device):
    """Right-padded input_ids, attention_mask, and labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention[i, :len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
            "labels": labels.to(device)}


def token_loss_sum(logits, labels):
    """(sum of next-token NLL, number of loss tokens) in float64: the mean over a data set is
    sum/count over all batches, whatever the batch size or padding."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll.double(), int((shift_labels != IGNORE).sum())
