"""The demo knowledge corpus: fictional people and companies with facts, in many phrasings.

Deterministic for a given seed. Each relation has training templates (statements and questions)
and held-out templates that training never sees: asking known facts through the held-out
templates measures whether the model learned the fact or the sentence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

FIRST_NAMES = """Ada Alba Anton Arlo Bea Bruno Cala Cyrus Dara Dario Edda Elio Esme Ezra Faye Felix
Gaia Gideon Hana Hugo Ida Ivo Jana Jonas Kira Kasimir Lena Linus Mara Milo Nadia Nico Odile Oren
Pia Pavel Quinn Rafe Rosa Rufus Sana Silas Tala Tobias Una Ulric Vera Viktor Wren Wolf Xenia Yara
Yusuf Zara Zeno Ines Otto Lior Maren Teo""".split()

SURNAME_HEADS = """Vance Hollow Brisk Calder Dunmore Elwood Farrow Garnet Halden Ingram Jessop Kestrel
Lindqvist Marlow Norcross Oakes Pellham Quarry Rainer Sallow Thorne Upton Varga Whitlock Yardley
Zeller Ashdown Brandt Corrigan Delacroix Ellery Fenwick Grisholm Harrow Ilves Juniper Kovac Lark
Moreau Nyberg Orsini Pryce Quill Rook Stroud Tamsin Umber Vail Wexley Abernethy""".split()

CITIES = """Lisbon Oslo Tallinn Porto Lyon Graz Bergen Malmo Turin Ghent Krakow Seville Dublin Riga
Vilnius Bilbao Nantes Leipzig Utrecht Aarhus Zagreb Split Basel Bremen Cork Geneva Trieste Lucerne
Salzburg Antwerp Tampere Brno Granada Bologna Marseille Bordeaux Verona Dresden Galway Uppsala""".split()

COMPANY_FIRST = """Orbital Nimbus Granite Copper Lumen Vector Harbor Summit Quartz Meridian Falcon
Cobalt Pioneer Juniper Atlas Beacon Crescent Delta Ember Frontier""".split()

COMPANY_SECOND = """Foods Labs Motors Systems Textiles Robotics Optics Freight Pharma Studios Energy
Mining Bank Foundry Airways Media""".split()

PROFESSIONS = """baker chemist dentist farmer geologist lawyer nurse painter pilot sculptor surgeon
teacher banker carpenter designer diplomat journalist librarian mechanic musician novelist pharmacist
physicist plumber poet tailor translator veterinarian writer zoologist""".split()

# relation -> (training templates, held-out templates); "{s}" is the subject, the answer follows.
TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "birth_city": (
        [
            "{s} was born in",
            "Where was {s} born?",
            "The birthplace of {s} is",
            "{s} comes from the city of",
            "Q: In which city was {s} born? A:",
        ],
        ["Which city was {s} born in?", "{s} was born in the city of"],
    ),
    "employer": (
        [
            "{s} works for",
            "Who does {s} work for?",
            "The employer of {s} is",
            "{s} is employed by",
            "Q: Which company employs {s}? A:",
        ],
        ["Which company does {s} work for?", "The company that employs {s} is"],
    ),
    "profession": (
        [
            "{s} works as a",
            "What is the profession of {s}?",
            "The job of {s} is",
            "{s} is by profession a",
            "Q: What does {s} do for a living? A:",
        ],
        ["What is the job of {s}?", "The profession of {s} is"],
    ),
    "birth_year": (
        [
            "{s} was born in the year",
            "In what year was {s} born?",
            "The birth year of {s} is",
            "Q: When was {s} born? A:",
            "{s}'s year of birth is",
        ],
        ["What year was {s} born in?", "The year of birth of {s} is"],
    ),
    "headquarters": (
        [
            "{s} is headquartered in",
            "Where is {s} headquartered?",
            "The headquarters of {s} are in",
            "Q: In which city is {s} based? A:",
            "{s} has its main office in",
        ],
        ["Which city is {s} headquartered in?", "{s} is based in the city of"],
    ),
    "founder": (
        [
            "{s} was founded by",
            "Who founded {s}?",
            "The founder of {s} is",
            "Q: Who started {s}? A:",
            "{s} was started by",
        ],
        ["Who was {s} founded by?", "The person who founded {s} is"],
    ),
}

PERSON_RELATIONS = ("birth_city", "employer", "profession", "birth_year")
COMPANY_RELATIONS = ("headquarters", "founder")


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    answer: str


@dataclass(frozen=True)
class Example:
    """One prompt whose correct continuation is ``" " + answer``."""

    prompt: str
    answer: str
    fact: Fact
    template: int
    held_out: bool


def render(template: str, subject: str) -> str:
    return template.format(s=subject)


def prompts_for(fact: Fact, held_out: bool = False) -> list[str]:
    train, heldout = TEMPLATES[fact.relation]
    return [render(t, fact.subject) for t in (heldout if held_out else train)]


@dataclass
class DemoCorpus:
    people: list[str]
    companies: list[str]
    facts: list[Fact]
    seed: int
    reserved_names: list[str] = field(default_factory=list)  # never used in training

    def examples(self, held_out: bool) -> list[Example]:
        out = []
        for fact in self.facts:
            train, heldout = TEMPLATES[fact.relation]
            for i, template in enumerate(heldout if held_out else train):
                out.append(Example(render(template, fact.subject), fact.answer, fact, i, held_out))
        return out

    def training_texts(self) -> list[str]:
        return [f"{e.prompt} {e.answer}" for e in self.examples(held_out=False)]

    def all_texts(self) -> list[str]:
        """Every phrasing, held-out ones included: the tokenizer's training text, so that held-out
        prompts tokenize into known pieces (their *facts* are still never trained on)."""
        texts = self.training_texts()
        texts += [e.prompt for e in self.examples(held_out=True)]
        texts += self.reserved_names
        return texts

    def answers_for(self, relation: str) -> list[str]:
        return sorted({f.answer for f in self.facts if f.relation == relation})


def build_corpus(seed: int = 0, n_people: int = 250, n_companies: int = 60) -> DemoCorpus:
    """The deterministic demo corpus: n_people * 4 + n_companies * 2 facts."""
    rng = random.Random(seed)
    names = [f"{first} {last}" for first in FIRST_NAMES for last in SURNAME_HEADS]
    rng.shuffle(names)
    n_reserved = 200
    if n_people + n_reserved > len(names):
        raise ValueError(f"at most {len(names) - n_reserved} people can be generated")
    people, reserved = names[:n_people], names[n_people : n_people + n_reserved]
    companies = [f"{a} {b}" for a in COMPANY_FIRST for b in COMPANY_SECOND]
    rng.shuffle(companies)
    if n_companies > len(companies):
        raise ValueError(f"at most {len(companies)} companies can be generated")
    companies = companies[:n_companies]
    facts = []
    for person in people:
        facts.append(Fact(person, "birth_city", rng.choice(CITIES)))
        facts.append(Fact(person, "employer", rng.choice(companies)))
        facts.append(Fact(person, "profession", rng.choice(PROFESSIONS)))
        facts.append(Fact(person, "birth_year", str(rng.randint(1940, 1999))))
    for company in companies:
        facts.append(Fact(company, "headquarters", rng.choice(CITIES)))
        facts.append(Fact(company, "founder", rng.choice(people)))
    return DemoCorpus(people, companies, facts, seed, reserved)
