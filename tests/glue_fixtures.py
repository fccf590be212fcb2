"""Small GLUE files in the original download layout, the records they must parse to, and a
tiny WordPiece tokenizer trained offline. Rows are taken from (or shaped like) the real files:
CoLA train/dev without a header, MRPC's header behind a byte-order mark, MNLI's parse columns,
literal double quotes (GLUE TSVs are not CSV-quoted)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import (
    Tokenizer,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from widenet_ds.glue import GlueExample

BOM = "\ufeff"
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
               "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")


def _mnli_row(index: int, s1: str, s2: str, labels: tuple[str, ...] = ()) -> str:
    """A row of an MNLI file: 8 id / genre / parse columns, the two sentences, then any label columns."""
    parses = [f"( {s1} )", f"( {s2} )", f"(ROOT {s1})", f"(ROOT {s2})"]
    return "\t".join([str(index), "31193", f"31193{index}n", "government", *parses, s1, s2, *labels]) + "\n"


GLUE_FILES: dict[str, str] = {
    "CoLA/train.tsv": "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
                      "gj04\t0\t*\tThey drank the pub.\n",
    "CoLA/dev.tsv": "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n",
    "CoLA/test.tsv": "index\tsentence\n0\tBill whistled past the house.\n1\tThe car honked its way down the road.\n",
    "SST-2/train.tsv": "sentence\tlabel\n\"funny\" and \"touching\t1\n"
                       "hide new secretions from the parental units \t0\n",
    "SST-2/dev.tsv": "sentence\tlabel\nit 's a charming and often affecting journey . \t1\n",
    "SST-2/test.tsv": "index\tsentence\n0\tuneasy mishmash of styles and genres .\n",
    "MRPC/train.tsv": BOM + MRPC_HEADER
    + "1\t702876\t702977\tAmrozi accused his brother , whom he called \" the witness \" , of deliberately "
      "distorting his evidence .\tReferring to him as only \" the witness \" , Amrozi accused his brother of "
      "deliberately distorting his evidence .\n"
    + "0\t2108705\t2108831\tYucaipa owned Dominick 's before selling the chain to Safeway in 1998 .\t"
      "Yucaipa bought Dominick 's in 1995 .\n",
    "MRPC/dev.tsv": BOM + MRPC_HEADER + "1\t1355540\t1355592\tHe said the foodservice pie business doesn 't fit .\t"
                                        "The foodservice pie business does not fit .\n",
    "MRPC/test.tsv": "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                     "0\t1089874\t1089925\tPCCW 's chief operating officer will report directly to Mr So .\t"
                     "Mike Butcher will report to So .\n",
    "STS-B/train.tsv": f"{STSB_HEADER}\tscore\n"
                       "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
                       "An air plane is taking off.\t5.000\n"
                       "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a large flute.\t"
                       "A man is playing a flute.\t3.800\n",
    "STS-B/dev.tsv": f"{STSB_HEADER}\tscore\n"
                     "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\t"
                     "A man wearing a hard hat is dancing.\t0.250\n"
                     "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA young child is riding a horse.\t"
                     "A child is riding a horse.\t4.750\n",
    "STS-B/test.tsv": f"{STSB_HEADER}\n"
                      "0\tmain-captions\tMSRvid\t2012test\t0024\tnone\tnone\tA girl is styling her hair.\t"
                      "A girl is brushing her hair.\n",
    "QQP/train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                     "133273\t213221\t213222\tHow do I learn Python?\tWhat is the best way to learn Python?\t1\n"
                     "402555\t536040\t536041\tWhy is the sky blue?\tWhat is \"Rayleigh\" scattering?\t0\n",
    "QQP/dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                   "201359\t303345\t303346\tWhy are rockets white?\tWhy are boosters painted white?\t1\n",
    "QQP/test.tsv": "id\tquestion1\tquestion2\n0\tWhy do rockets look white?\tWhy are rockets painted white?\n",
    "MNLI/train.tsv": f"{MNLI_HEADER}\tlabel1\tgold_label\n"
                      + _mnli_row(0, "Conceptually cream skimming has two basic dimensions.",
                                  "Product and geography are what make cream skimming work.", ("neutral", "neutral"))
                      + _mnli_row(1, "you know during the season i guess", "You lose the things.",
                                  ("entailment", "entailment")),
    "MNLI/dev_matched.tsv": f"{MNLI_HEADER}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
                            + _mnli_row(0, "The new rights are nice enough", "Everyone really likes the rights.",
                                        ("neutral", "contradiction", "contradiction", "neutral", "contradiction",
                                         "contradiction")),
    "MNLI/dev_mismatched.tsv": f"{MNLI_HEADER}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
                               + _mnli_row(0, "Your contribution helped make it possible.",
                                           "Your contributions were of no help.",
                                           ("contradiction",) * 5 + ("contradiction",))
                               + _mnli_row(1, "The \"Hamlet\" staging was long.", "The staging took hours.",
                                           ("entailment", "neutral", "entailment", "entailment", "entailment",
                                            "entailment")),
    "MNLI/test_matched.tsv": f"{MNLI_HEADER}\n" + _mnli_row(0, "Hierbas is a sweet drink.", "It is sweet."),
    "MNLI/test_mismatched.tsv": f"{MNLI_HEADER}\n" + _mnli_row(0, "What have you decided?", "Have you decided?")
                                + _mnli_row(1, "Sure, said Jack.", "Jack agreed."),
    "diagnostic/diagnostic.tsv": "index\tsentence1\tsentence2\n0\tThe cat sat on the mat.\tThe cat did not sit.\n",
    "QNLI/train.tsv": "index\tquestion\tsentence\tlabel\n"
                      "0\tWhen did the third Digimon series begin?\tDigimon Tamers takes a darker approach.\t"
                      "not_entailment\n"
                      "1\tWhat came into force after the new constitution was herald?\tAs of that day, the new "
                      "constitution heralding the Second Republic came into force.\tentailment\n",
    "QNLI/dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWhat is the capital?\tThe capital is Paris.\tentailment\n",
    "QNLI/test.tsv": "index\tquestion\tsentence\n0\tWhat organization is devoted to Jihad?\tIt is devoted to it.\n",
    "RTE/train.tsv": "index\tsentence1\tsentence2\tlabel\n"
                     "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found in "
                     "Iraq.\tnot_entailment\n"
                     "1\tA place of sorrow, after Pope John Paul II died, became a place of celebration.\t"
                     "Pope John Paul II died.\tentailment\n",
    "RTE/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tDana Reeve died of lung cancer.\tDana Reeve died.\t"
                   "entailment\n",
    "RTE/test.tsv": "index\tsentence1\tsentence2\n0\tMangla was an Indian woman.\tMangla was Indian.\n",
    "WNLI/train.tsv": "index\tsentence1\tsentence2\tlabel\n"
                      "0\tI stuck a pin through a carrot. When I pulled the pin out, it had a hole.\t"
                      "The carrot had a hole.\t1\n"
                      "1\tJohn couldn't see the stage with Billy in front of him because he is so short.\t"
                      "Billy is so short.\t0\n",
    "WNLI/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tThe drain is clogged with hair. It has to be cleaned.\t"
                    "The hair has to be cleaned.\t0\n",
    "WNLI/test.tsv": "index\tsentence1\tsentence2\n0\tMaude and Dora had seen the trains.\tThey had seen trains.\n",
}

E = GlueExample
EXPECTED: dict[tuple[str, str], list[GlueExample]] = {
    ("cola", "train"): [E(0, "Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
                        E(1, "They drank the pub.", None, 0)],
    ("cola", "validation"): [E(0, "The sailors rode the breeze clear of the rocks.", None, 1)],
    ("cola", "test"): [E(0, "Bill whistled past the house.", None, None),
                       E(1, "The car honked its way down the road.", None, None)],
    ("sst2", "train"): [E(0, '"funny" and "touching', None, 1),  # an unbalanced quote is literal text
                        E(1, "hide new secretions from the parental units ", None, 0)],
    ("sst2", "validation"): [E(0, "it 's a charming and often affecting journey . ", None, 1)],
    ("sst2", "test"): [E(0, "uneasy mishmash of styles and genres .", None, None)],
    ("mrpc", "train"): [
        E(0, 'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .',
          'Referring to him as only " the witness " , Amrozi accused his brother of deliberately distorting his '
          'evidence .', 1),
        E(1, "Yucaipa owned Dominick 's before selling the chain to Safeway in 1998 .",
          "Yucaipa bought Dominick 's in 1995 .", 0)],
    ("mrpc", "validation"): [E(0, "He said the foodservice pie business doesn 't fit .",
                               "The foodservice pie business does not fit .", 1)],
    ("mrpc", "test"): [E(0, "PCCW 's chief operating officer will report directly to Mr So .",
                         "Mike Butcher will report to So .", None)],
    ("stsb", "train"): [E(0, "A plane is taking off.", "An air plane is taking off.", 5.0),
                        E(1, "A man is playing a large flute.", "A man is playing a flute.", 3.8)],
    ("stsb", "validation"): [E(0, "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 0.25),
                             E(1, "A young child is riding a horse.", "A child is riding a horse.", 4.75)],
    ("stsb", "test"): [E(0, "A girl is styling her hair.", "A girl is brushing her hair.", None)],
    ("qqp", "train"): [E(0, "How do I learn Python?", "What is the best way to learn Python?", 1),
                       E(1, "Why is the sky blue?", 'What is "Rayleigh" scattering?', 0)],
    ("qqp", "validation"): [E(0, "Why are rockets white?", "Why are boosters painted white?", 1)],
    ("qqp", "test"): [E(0, "Why do rockets look white?", "Why are rockets painted white?", None)],
    ("mnli", "train"): [E(0, "Conceptually cream skimming has two basic dimensions.",
                          "Product and geography are what make cream skimming work.", 1),
                        E(1, "you know during the season i guess", "You lose the things.", 0)],
    ("mnli", "validation_matched"): [E(0, "The new rights are nice enough", "Everyone really likes the rights.", 2)],
    ("mnli", "validation_mismatched"): [E(0, "Your contribution helped make it possible.",
                                          "Your contributions were of no help.", 2),
                                        E(1, 'The "Hamlet" staging was long.', "The staging took hours.", 0)],
    ("mnli", "test_matched"): [E(0, "Hierbas is a sweet drink.", "It is sweet.", None)],
    ("mnli", "test_mismatched"): [E(0, "What have you decided?", "Have you decided?", None),
                                  E(1, "Sure, said Jack.", "Jack agreed.", None)],
    ("mnli", "ax"): [E(0, "The cat sat on the mat.", "The cat did not sit.", None)],
    ("qnli", "train"): [E(0, "When did the third Digimon series begin?", "Digimon Tamers takes a darker approach.", 1),
                        E(1, "What came into force after the new constitution was herald?",
                          "As of that day, the new constitution heralding the Second Republic came into force.", 0)],
    ("qnli", "validation"): [E(0, "What is the capital?", "The capital is Paris.", 0)],
    ("qnli", "test"): [E(0, "What organization is devoted to Jihad?", "It is devoted to it.", None)],
    ("rte", "train"): [E(0, "No Weapons of Mass Destruction Found in Iraq Yet.",
                         "Weapons of Mass Destruction Found in Iraq.", 1),
                       E(1, "A place of sorrow, after Pope John Paul II died, became a place of celebration.",
                         "Pope John Paul II died.", 0)],
    ("rte", "validation"): [E(0, "Dana Reeve died of lung cancer.", "Dana Reeve died.", 0)],
    ("rte", "test"): [E(0, "Mangla was an Indian woman.", "Mangla was Indian.", None)],
    ("wnli", "train"): [E(0, "I stuck a pin through a carrot. When I pulled the pin out, it had a hole.",
                          "The carrot had a hole.", 1),
                        E(1, "John couldn't see the stage with Billy in front of him because he is so short.",
                          "Billy is so short.", 0)],
    ("wnli", "validation"): [E(0, "The drain is clogged with hair. It has to be cleaned.",
                               "The hair has to be cleaned.", 0)],
    ("wnli", "test"): [E(0, "Maude and Dora had seen the trains.", "They had seen trains.", None)],
}


def write_glue_layout(root: Path, files: dict[str, str] = GLUE_FILES) -> Path:
    """Write ``files`` (relative path -> content) under ``root``; returns root."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return root


def tiny_tokenizer(texts: list[str], vocab_size: int = 200) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer trained on ``texts``: [CLS] A [SEP] B [SEP], B typed 1."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
