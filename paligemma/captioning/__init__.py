"""The captioning application built on the model: what train.py and evaluate.py are made of.

data.py         captions on disk (RISC CSV / JSONL layout) -> examples, with bad rows named or skipped
training.py     the pieces of train.py: batches, collate, learning-rate schedule, checks, checkpoints
distributed.py  torchrun: DDP and FSDP2
curves.py       loss.png
metrics.py      BLEU / METEOR / ROUGE-L / CIDEr-D with the COCO toolkit's conventions
meteor_java.py  METEOR 1.5 by pycocoevalcap's jar, one JVM per evaluation
bootstrap.py    95 % intervals over images and paired comparisons (resampled_cider.py: CIDEr-D's part)
wordnet.py      the WordNet database METEOR needs, built offline from Debian's files
synthetic.py    the embedded demo: procedural aerial scenes, and a tiny model to train on them
"""
