"""Build the tiny byte-level BPE tokenizer shipped in mm_moslora/model/tiny/ (run once; output is committed).

    python scripts/build_tiny_tokenizer.py [--vocab-size 768]

Byte-level, so any text encodes; merges are learned on the vocabulary of the built-in demo data and
common chat words, so demo prompts stay short. Carries a chat template (USER:/ASSISTANT: turns).
"""
import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TINY_DIR = Path(__file__).resolve().parent.parent / "mm_moslora" / "model" / "tiny"
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
WORDS = """
a an the is are of in on at to and or with what which how many there image picture object objects shape shapes
colour color colours colors red green blue yellow purple orange pink brown black white grey gray cyan
circle circles square squares triangle triangles star stars cross crosses rectangle diamond
left right above below top bottom middle center centre further closer than next beside
yes no one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9 10
answer question using single word phrase with option's letter from given choices directly options
A B C D E context hint choose correct describe caption small large big tiny size count number
USER ASSISTANT system you assistant human helpful chat between curious artificial intelligence
Is Are What Which How Where Answer Question Options Context Please there's it's don't
mixing mix get do you plus minus times equals sum
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=768)
    args = ap.parse_args()
    words = WORDS.split()
    corpus = [" ".join(words[i:i + 12]) for i in range(0, len(words), 3)] * 20
    corpus += [f"{w} {w.capitalize()} {w}. {w}? {w}," for w in words] * 20
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=2048, chat_template=CHAT_TEMPLATE)
    TINY_DIR.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(TINY_DIR)
    print(f"wrote {TINY_DIR} (vocab {len(fast)})")


if __name__ == "__main__":
    main()
