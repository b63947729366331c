"""The prompts the testbed is trained to follow, in varied phrasings, and their answers.

The testbed should answer every prompt lvlm-fix's methods and evals send the way a LLaVA-1.5
model does: a caption for a caption request, exactly ``Yes`` / ``No`` for a yes/no question
(AMBER scores the exact words), one word when one word is asked for. So each task below lists
the product's own wording *and* paraphrases, and training draws from all of them; answer
suffixes and system prefixes are drawn independently of the task.

Tasks (what is asked -> what is answered):

* caption: a caption request -> the world's caption (``World.caption``);
* existence: "Is there a {obj} in the image?" (POPE) / "... in this image?" (AMBER) -> Yes/No;
* colour: "Is the {obj} {colour} in this image?" (AMBER attribute) -> Yes/No, and
  "What color is the {obj}?" -> the colour word;
* number: "Are there {two|three} {objs} in this image?" (AMBER number) -> Yes/No;
* relation: "Is there direct contact between the {a} and the {b}?" (AMBER relation) -> Yes/No,
  contact as defined by ``World.contacts``;
* in-context caption: MVP's "Here is the caption of the image:\\n{caption}\\nQuestion: {q}" ->
  Yes/No from the image (the caption may be wrong, as a model's own caption can be);
* general one-word: "Write a general description of the image." plus a one-word suffix (CARVE's
  contrast prompt) -> the scene's theme word.

System prefixes (prepended as plain text before ``USER:``, as the chat template does): the
vicuna prompt and ICD's disturbance instructions. Questions are answered normally under every
prefix (a direct question gets a direct answer). Caption requests are answered normally too,
except where the instruction itself asks for less: "avoid any specific identification or
categorization" -> a caption that names no category (colours and counts only), and "a confused
objects detector ... a fuzzy overview or impression" -> only the scene's theme. That is plain
instruction following; no prefix is trained to *hallucinate*.

Templates use ``{a_obj}`` ("a dog" / "an umbrella"), ``{obj}``, ``{objs}`` (plural), ``{n}`` (a
number word), ``{colour}``, ``{a}`` / ``{b}`` (two object names) and ``{caption}`` / ``{question}``.
"""

from __future__ import annotations

from ..prompts import VICUNA_SYSTEM_PROMPT
from ..interventions.icd import DISTURBANCES
from .world import CAPTION_PROMPT, CATEGORIES, COLOUR_NAMES, NUMBER_WORDS, THEMES, article

# -- caption requests -------------------------------------------------------------------------------
MVP_VIEW_PROMPTS: tuple[str, ...] = (
    "Through a systematic examination of the image at the pixel level and by analyzing various visual "
    "features, such as shape, color, and texture, along with employing object detection techniques, "
    "describe this image in details.",
    "Given the overall scene depicted in the image, taking into account the context, environmental "
    "factors, and any relevant visual cues, describe this image in details.",
)
GENERAL_INSTRUCTION = "Write a general description of the image."  # CARVE's contrast prompt
CAPTION_PROMPTS: tuple[str, ...] = (
    # Sent by lvlm-fix (evals, OPERA/VCD-style CHAIR prompts, MVP, CARVE):
    CAPTION_PROMPT,
    "Please help me describe the image in detail.",
    "Describe this image.",
    "Describe this image",
    "Describe this image in details.",
    GENERAL_INSTRUCTION,
    *MVP_VIEW_PROMPTS,
    # Paraphrases, so that the behaviour is tied to the request, not to one string:
    "Describe the image.",
    "Describe the image in detail.",
    "Please describe the image.",
    "Describe this picture.",
    "Can you describe this image?",
    "What is in this image?",
    "What do you see in the image?",
    "Give a detailed description of the image.",
    "Write a description of this picture.",
    "Tell me what is in the picture.",
    "Provide a short caption for this image.",
)

# -- yes/no questions -------------------------------------------------------------------------------
EXISTENCE_TEMPLATES: tuple[str, ...] = (
    "Is there {a_obj} in the image?",      # POPE
    "Is there {a_obj} in this image?",     # AMBER
    "Is there {a_obj} in the picture?",
    "Does the image contain {a_obj}?",
    "Do you see {a_obj} in the image?",
    "Can you see {a_obj} in this picture?",
    "Is {a_obj} present in the image?",
    "Is {a_obj} visible in this image?",
)
COLOUR_CHECK_TEMPLATES: tuple[str, ...] = (
    "Is the {obj} {colour} in this image?",  # AMBER attribute (state)
    "Is the {obj} {colour}?",
    "Is the {obj} in the image {colour}?",
    "Is the color of the {obj} {colour}?",
)
NUMBER_TEMPLATES: tuple[str, ...] = (
    "Are there {n} {objs} in this image?",  # AMBER attribute (number)
    "Are there {n} {objs} in the image?",
    "Does the image show {n} {objs}?",
    "Can you see {n} {objs} in this picture?",
)
RELATION_TEMPLATES: tuple[str, ...] = (
    "Is there direct contact between the {a} and the {b}?",  # AMBER relation
    "Is the {a} touching the {b}?",
    "Does the {a} touch the {b}?",
    "Are the {a} and the {b} in contact?",
)

# -- open questions with a one-word answer ----------------------------------------------------------
COLOUR_QUERY_TEMPLATES: tuple[str, ...] = (
    "What color is the {obj}?",             # the region task
    "What colour is the {obj}?",
    "What is the color of the {obj}?",
    "What color is the {obj} in the image?",
)

# -- answer-format suffixes -------------------------------------------------------------------------
ONE_WORD_SUFFIXES: tuple[str, ...] = (
    "\nAnswer the question using a single word or phrase.",  # LLaVA / lmms-eval POPE
    " Answer the question using a single word or phrase.",   # CARVE
    " Please answer this question with one word.",           # VCD
    "\nAnswer with a single word.",
    " Answer in one word.",
)
YES_NO_SUFFIXES: tuple[str, ...] = (
    " Please only answer yes or no.",                        # ICD
    " Answer yes or no.",
    "\nPlease answer with yes or no.",
)

# -- system prefixes --------------------------------------------------------------------------------
VICUNA_SYSTEM = VICUNA_SYSTEM_PROMPT  # LLaVA-1.5's, as the eval presets send it
ICD_INSTRUCTIONS: tuple[str, ...] = (
    *DISTURBANCES,  # the five ICD sends, in its order
    "You are a confused object detector to provide a fuzzy overview or impression of the image.",
)
NO_NAMES_SYSTEMS: frozenset[str] = frozenset({ICD_INSTRUCTIONS[2]})
FUZZY_SYSTEMS: frozenset[str] = frozenset({ICD_INSTRUCTIONS[3], ICD_INSTRUCTIONS[5]})

# -- MVP's multi-path prompt -----------------------------------------------------------------------
IN_CONTEXT_TEMPLATE = "Here is the caption of the image:\n{caption}\nQuestion: {question}"


def with_article(noun: str) -> str:
    """``"a dog"`` / ``"an umbrella"``: "an" before a vowel, as POPE writes it."""
    return f"{article(noun)} {noun}"


def existence_question(obj: str, template: str = EXISTENCE_TEMPLATES[0]) -> str:
    """A yes/no existence question about one category."""
    return template.format(a_obj=with_article(obj))


def colour_check_question(obj: str, colour: str, template: str = COLOUR_CHECK_TEMPLATES[0]) -> str:
    """A yes/no colour (AMBER attribute-state) question."""
    return template.format(obj=obj, colour=colour)


def number_question(plural: str, n: int, template: str = NUMBER_TEMPLATES[0]) -> str:
    """A yes/no count (AMBER attribute-number) question, ``n`` written as a word."""
    return template.format(objs=plural, n=NUMBER_WORDS[n])


def relation_question(a: str, b: str, template: str = RELATION_TEMPLATES[0]) -> str:
    """A yes/no direct-contact (AMBER relation) question."""
    return template.format(a=a, b=b)


def colour_query(obj: str, template: str = COLOUR_QUERY_TEMPLATES[0]) -> str:
    """An open colour question, answered with one colour word."""
    return template.format(obj=obj)


def in_context_prompt(caption: str, question: str) -> str:
    """MVP's multi-path prompt: a caption in context, then the question lower-cased (as MVP does)."""
    return IN_CONTEXT_TEMPLATE.format(caption=caption, question=question.lower())


def with_system(system: str | None, text: str) -> str:
    """``system`` prepended as the chat template renders a system message: content, then a space."""
    return f"{system} {text}" if system else text


def example_prompts() -> list[str]:
    """Every template instantiated at least once per slot value, plus every suffix and prefix.

    Used to build the vocabulary (every word any trained prompt can contain) and by tests.
    """
    names = [c.name for c in CATEGORIES]
    plurals = [c.plural for c in CATEGORIES]
    questions = [existence_question(o, t) for t in EXISTENCE_TEMPLATES for o in names]
    questions += [colour_check_question(o, c, t) for t in COLOUR_CHECK_TEMPLATES for o in names[:1]
                  for c in COLOUR_NAMES]
    questions += [colour_check_question(o, COLOUR_NAMES[0]) for o in names]
    questions += [number_question(p, n, t) for t in NUMBER_TEMPLATES for p in plurals for n in (2, 3)]
    questions += [relation_question(a, names[0], t) for t in RELATION_TEMPLATES for a in names]
    questions += [colour_query(o, t) for t in COLOUR_QUERY_TEMPLATES for o in names]
    suffixed = [q + s for q in questions[:1] for s in (*ONE_WORD_SUFFIXES, *YES_NO_SUFFIXES)]
    suffixed += [GENERAL_INSTRUCTION + s for s in ONE_WORD_SUFFIXES]
    in_context = [in_context_prompt("a red dog .", q) for q in questions + suffixed]
    systems = [with_system(s, CAPTION_PROMPT) for s in (VICUNA_SYSTEM, *ICD_INSTRUCTIONS)]
    return [*CAPTION_PROMPTS, *questions, *suffixed, *in_context, *systems, *THEMES]
