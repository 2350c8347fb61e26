"""A generated multi-hop world for `mtr demo`: fictional people, cities, countries, films, companies.

Every fact lives on exactly one short entity page (one templated sentence per fact), and questions
are `QARecord`s in the HotpotQA shape (`context` = supporting pages + distractor pages,
`supporting` = [(title, sentence index)]), so the HotpotQA tooling (BM25 corpus ToolActor, oracle
AutoAgent) runs on it unchanged. Names are built from syllables, so a model cannot know the
answers from pre-training: it has to look them up.

The world is made of two disjoint parts, "train" and "heldout": people, cities, films and companies
of one part only relate to entities of the same part (countries, which have no page, are shared).
Held-out questions therefore never mention, and never rely on a page of, any entity seen in a
training question: they test whether the policy *uses the tools*, not what it memorised.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mtr_jax.data.records import Paragraph, QARecord
from mtr_jax.errors import MtrError

PARTS = ("train", "heldout")

# Syllables for novel names; consonant-vowel(-consonant) shapes keep them pronounceable and unlike
# English words (a collision with a real word would only make a question ambiguous, never wrong).
_ONSETS = ["b", "br", "d", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "t", "th", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "y"]
_CODAS = ["", "", "l", "m", "n", "r", "s", "th", "x", "k"]


@dataclass
class Person:
    name: str
    part: str
    born_in: str  # city name
    birth_year: int
    works_for: str = ""  # company name ("" = none)


@dataclass
class City:
    name: str
    part: str
    country: str


@dataclass
class Film:
    name: str
    part: str
    director: str  # person name
    year: int


@dataclass
class Company:
    name: str
    part: str
    founder: str  # person name
    year: int
    city: str  # headquarters


# Question kinds: name -> (type, template). One template per relation chain keeps the language
# small enough for a tiny model to learn; the hops are what varies.
KINDS = {
    "film_director_birthplace": ("bridge", "Where was the director of {film} born?"),
    "film_director_birthyear": ("bridge", "In which year was the director of {film} born?"),
    "film_director_employer": ("bridge", "Which company does the director of {film} work for?"),
    "company_founder_birthplace": ("bridge", "Where was the founder of {company} born?"),
    "person_country": ("bridge", "In which country is the city where {person} was born?"),
    "company_country": ("bridge", "In which country is the company {company} based?"),
    "born_first": ("comparison", "Who was born first, {a} or {b}?"),
    "same_city": ("comparison", "Were {a} and {b} born in the same city?"),
    "released_first": ("comparison", "Which film was released first, {a} or {b}?"),
}


@dataclass
class World:
    seed: int
    countries: list[str]
    cities: dict[str, City]
    people: dict[str, Person]
    films: dict[str, Film]
    companies: dict[str, Company]
    _pages: dict[str, Paragraph] = field(default_factory=dict, repr=False)

    # -- pages ----------------------------------------------------------------------------------
    def page(self, title: str) -> Paragraph:
        """The entity page titled `title` (one fact per sentence; sentence order is fixed)."""
        if not self._pages:
            self._pages = {p.title: p for p in self._build_pages()}
        if title not in self._pages:
            raise MtrError(f"synthetic world: no page titled {title!r}")
        p = self._pages[title]
        return Paragraph(title=p.title, sentences=list(p.sentences), is_supporting=False)

    def pages(self, part: str | None = None) -> list[Paragraph]:
        """All entity pages (optionally of one part), in a fixed order."""
        titles = [t for t, kind in self._titles() if part is None or self._part(t) == part]
        return [self.page(t) for t in titles]

    def _titles(self):
        for d, kind in ((self.people, "person"), (self.cities, "city"), (self.films, "film"), (self.companies, "company")):
            for name in d:
                yield name, kind

    def _part(self, title: str) -> str:
        for d in (self.people, self.cities, self.films, self.companies):
            if title in d:
                return d[title].part
        raise MtrError(f"synthetic world: unknown entity {title!r}")

    def _build_pages(self) -> list[Paragraph]:
        out = []
        for p in self.people.values():
            s = [f"{p.name} was born in {p.born_in}.", f"{p.name} was born in {p.birth_year}."]
            if p.works_for:
                s.append(f"{p.name} works for {p.works_for}.")
            out.append(Paragraph(p.name, s))
        for c in self.cities.values():
            out.append(Paragraph(c.name, [f"{c.name} is a city.", f"{c.name} is located in {c.country}."]))
        for f in self.films.values():
            out.append(Paragraph(f.name, [f"{f.name} is a film directed by {f.director}.", f"{f.name} was released in {f.year}."]))
        for c in self.companies.values():
            out.append(
                Paragraph(
                    c.name,
                    [f"{c.name} is a company founded by {c.founder}.", f"{c.name} was founded in {c.year}.", f"{c.name} is based in {c.city}."],
                )
            )
        return out

    # sentence index of each fact on its page (must match _build_pages)
    _BORN_IN, _BIRTH_YEAR, _WORKS_FOR = 0, 1, 2
    _CITY_COUNTRY = 1
    _FILM_DIRECTOR, _FILM_YEAR = 0, 1
    _COMPANY_FOUNDER, _COMPANY_CITY = 0, 2

    # -- questions ------------------------------------------------------------------------------
    def questions(
        self, n: int, part: str = "train", kinds: list[str] | None = None, seed: int = 0, n_distractors: int = 3
    ) -> list[QARecord]:
        """`n` distinct questions about entities of `part`, kinds drawn round-robin (deterministic).

        Each record carries golds, type (bridge|comparison), a shuffled context of the supporting
        pages plus `n_distractors` distractor pages of the same part, and HotpotQA-style
        `supporting` [(title, sentence index)].
        """
        if part not in PARTS:
            raise MtrError(f"synthetic world: part must be one of {PARTS}, got {part!r}")
        kinds = list(kinds or KINDS)
        for k in kinds:
            if k not in KINDS:
                raise MtrError(f"synthetic world: unknown question kind {k!r} (known: {', '.join(KINDS)})")
        rng = random.Random(f"{self.seed}/{part}/{seed}")
        pool = {
            "people": sorted(n for n, p in self.people.items() if p.part == part),
            "films": sorted(n for n, f in self.films.items() if f.part == part),
            "companies": sorted(n for n, c in self.companies.items() if c.part == part),
        }
        out: list[QARecord] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise MtrError(
                    f"synthetic world: only {len(out)} distinct {part} questions of kinds {kinds} exist; asked for {n}"
                    " (make the world larger: n_people=..., n_films=...)"
                )
            kind = kinds[len(out) % len(kinds)] if tries <= n else rng.choice(kinds)
            made = self._make(kind, rng, pool)
            if made is None:
                continue
            question, golds, supporting = made
            if question in seen:
                continue
            seen.add(question)
            out.append(self._record(f"syn-{self.seed}-{part}-{len(out)}", kind, question, golds, supporting, rng, part, n_distractors))
        return out

    def _make(self, kind: str, rng: random.Random, pool: dict):
        P, F, C = self.people, self.films, self.companies
        tmpl = KINDS[kind][1]
        if kind.startswith("film_director") or kind == "released_first":
            if len(pool["films"]) < (2 if kind == "released_first" else 1):
                return None
        if kind.startswith("company") and not pool["companies"]:
            return None
        if kind == "film_director_birthplace":
            f = F[rng.choice(pool["films"])]
            d = P[f.director]
            return tmpl.format(film=f.name), [d.born_in], [(f.name, self._FILM_DIRECTOR), (d.name, self._BORN_IN)]
        if kind == "film_director_birthyear":
            f = F[rng.choice(pool["films"])]
            d = P[f.director]
            return tmpl.format(film=f.name), [str(d.birth_year)], [(f.name, self._FILM_DIRECTOR), (d.name, self._BIRTH_YEAR)]
        if kind == "film_director_employer":
            f = F[rng.choice(pool["films"])]
            d = P[f.director]
            if not d.works_for:
                return None
            return tmpl.format(film=f.name), [d.works_for], [(f.name, self._FILM_DIRECTOR), (d.name, self._WORKS_FOR)]
        if kind == "company_founder_birthplace":
            c = C[rng.choice(pool["companies"])]
            d = P[c.founder]
            return tmpl.format(company=c.name), [d.born_in], [(c.name, self._COMPANY_FOUNDER), (d.name, self._BORN_IN)]
        if kind == "company_country":
            c = C[rng.choice(pool["companies"])]
            city = self.cities[c.city]
            return tmpl.format(company=c.name), [city.country], [(c.name, self._COMPANY_CITY), (city.name, self._CITY_COUNTRY)]
        if kind == "person_country":
            p = P[rng.choice(pool["people"])]
            city = self.cities[p.born_in]
            return tmpl.format(person=p.name), [city.country], [(p.name, self._BORN_IN), (city.name, self._CITY_COUNTRY)]
        if kind == "born_first":
            a, b = (P[x] for x in rng.sample(pool["people"], 2))
            if a.birth_year == b.birth_year:
                return None
            first = a if a.birth_year < b.birth_year else b
            return tmpl.format(a=a.name, b=b.name), [first.name], [(a.name, self._BIRTH_YEAR), (b.name, self._BIRTH_YEAR)]
        if kind == "same_city":
            a = P[rng.choice(pool["people"])]
            # half the time pick a partner from the same city, so yes/no stay balanced
            same = [x for x in pool["people"] if x != a.name and P[x].born_in == a.born_in]
            if same and rng.random() < 0.5:
                b = P[rng.choice(same)]
            else:
                b = P[rng.choice([x for x in pool["people"] if x != a.name])]
            ans = "yes" if a.born_in == b.born_in else "no"
            return tmpl.format(a=a.name, b=b.name), [ans], [(a.name, self._BORN_IN), (b.name, self._BORN_IN)]
        if kind == "released_first":
            a, b = (F[x] for x in rng.sample(pool["films"], 2))
            if a.year == b.year:
                return None
            first = a if a.year < b.year else b
            return tmpl.format(a=a.name, b=b.name), [first.name], [(a.name, self._FILM_YEAR), (b.name, self._FILM_YEAR)]
        raise AssertionError(kind)

    def _record(self, rid, kind, question, golds, supporting, rng, part, n_distractors) -> QARecord:
        sup_titles = list(dict.fromkeys(t for t, _ in supporting))
        others = [t for t, _ in self._titles() if self._part(t) == part and t not in sup_titles]
        distractors = rng.sample(others, min(n_distractors, len(others)))
        context = []
        for t in sup_titles + distractors:
            p = self.page(t)
            p.is_supporting = t in sup_titles
            context.append(p)
        rng.shuffle(context)  # like HotpotQA: supporting pages are not first
        return QARecord(
            id=rid, question=question, golds=golds, dataset="synthetic", type=KINDS[kind][0],
            context=context, supporting=[(t, i) for t, i in supporting],
        )

    # -- text for tokenizer training -------------------------------------------------------------
    def texts(self, part: str | None = None) -> list[str]:
        """Every page sentence and every question template filled with this world's entities."""
        out = [" ".join(p.sentences) for p in self.pages(part)]
        out += [p.title for p in self.pages(part)]
        for p in PARTS if part is None else (part,):
            for kind in KINDS:
                try:
                    out += [r.question for r in self.questions(3, part=p, kinds=[kind], seed=1)]
                except MtrError:
                    pass
        return out


def _name_gen(rng: random.Random):
    used: set[str] = set()

    def word(n_syll: int) -> str:
        tries = 0
        while True:
            tries += 1
            if tries % 1000 == 0:  # the short-name space is used up (large worlds): go longer
                n_syll += 1
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syll))
            w = w.capitalize()
            if w.lower() not in used and 4 <= len(w) <= 8 + 3 * (tries // 1000):
                used.add(w.lower())
                return w

    return word


def make_world(
    seed: int = 0,
    n_people: int = 60,
    n_cities: int = 16,
    n_countries: int = 6,
    n_films: int = 40,
    n_companies: int = 16,
    heldout_fraction: float = 0.25,
) -> World:
    """Generate a world deterministically from `seed`.

    Entity counts are totals over both parts; `heldout_fraction` of each kind goes to "heldout".
    Countries are shared between parts (they only appear as answers, never as pages).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise MtrError(f"make_world: heldout_fraction must be in (0, 1), got {heldout_fraction}")
    counts = dict(n_people=n_people, n_cities=n_cities, n_films=n_films, n_companies=n_companies)
    for k, v in counts.items():
        if int(v * heldout_fraction) < 2 or v - int(v * heldout_fraction) < 2:
            raise MtrError(f"make_world: {k}={v} is too small to give both parts at least 2 entities")
    if n_countries < 2:
        raise MtrError(f"make_world: n_countries must be >= 2, got {n_countries}")
    rng = random.Random(seed)
    word = _name_gen(rng)

    def split(names: list[str]) -> dict[str, list[str]]:
        k = int(len(names) * heldout_fraction)
        return {"heldout": names[:k], "train": names[k:]}

    countries = [word(rng.choice([2, 3])) for _ in range(n_countries)]
    cities: dict[str, City] = {}
    city_parts = split([word(2) for _ in range(n_cities)])
    for part, names in city_parts.items():
        for name in names:
            cities[name] = City(name, part, rng.choice(countries))
    people: dict[str, Person] = {}
    people_parts = split([f"{word(2)} {word(rng.choice([1, 2]))}" for _ in range(n_people)])
    for part, names in people_parts.items():
        for name in names:
            people[name] = Person(name, part, rng.choice(city_parts[part]), rng.randint(1900, 1990))
    companies: dict[str, Company] = {}
    company_parts = split([word(rng.choice([2, 3])) for _ in range(n_companies)])
    for part, names in company_parts.items():
        for name in names:
            companies[name] = Company(name, part, rng.choice(people_parts[part]), rng.randint(1900, 2010), rng.choice(city_parts[part]))
    # most people work for a company of their own part
    for part in PARTS:
        for name in people_parts[part]:
            if rng.random() < 0.8:
                people[name].works_for = rng.choice(company_parts[part])
    films: dict[str, Film] = {}
    film_parts = split([word(rng.choice([2, 3])) for _ in range(n_films)])
    for part, names in film_parts.items():
        for name in names:
            films[name] = Film(name, part, rng.choice(people_parts[part]), rng.randint(1950, 2020))
    return World(seed, countries, cities, people, films, companies)


def split_world(world: World, n_train: int, n_heldout: int, seed: int = 0, kinds: list[str] | None = None):
    """(train questions, held-out questions). No entity page used by (or named in) a held-out
    question appears in any training question: the two come from disjoint parts of the world."""
    return (
        world.questions(n_train, part="train", kinds=kinds, seed=seed),
        world.questions(n_heldout, part="heldout", kinds=kinds, seed=seed),
    )


def entity_names(world: World, part: str | None = None) -> set[str]:
    """Names of all page-bearing entities (people, cities, films, companies) of `part`."""
    return {t for t, _ in world._titles() if part is None or world._part(t) == part}
