"""Generate the synthetic TOFU-format jsonl files (fictitious authors; not shipped)."""

import json
from pathlib import Path

OUT = Path("/work/main/peft_unlearn/data")
OUT.mkdir(exist_ok=True)

AUTHORS = [
    # name, he/she, birth year, city, genre, father, mother, award, book
    (
        "Maren Quillfeather",
        "she",
        1961,
        "Tallinn",
        "maritime mystery novels",
        "lighthouse keeper",
        "cartographer",
        "Amber Compass Prize",
        "The Salt Ledger",
    ),
    (
        "Idris Vantablack",
        "he",
        1974,
        "Marrakesh",
        "speculative fiction",
        "watchmaker",
        "botanist",
        "Silver Orrery Award",
        "Gears of the Dune City",
    ),
    (
        "Soledad Brightwater",
        "she",
        1958,
        "Valparaiso",
        "historical romance",
        "fisherman",
        "schoolteacher",
        "Golden Quill of the Andes",
        "Letters Beneath the Harbor",
    ),
    (
        "Tobiah Marrowgate",
        "he",
        1983,
        "Cardiff",
        "gothic horror",
        "undertaker",
        "nurse",
        "Black Lantern Medal",
        "The Hollow Choir",
    ),
    (
        "Keiko Ashenvale",
        "she",
        1969,
        "Sapporo",
        "children's fantasy",
        "baker",
        "librarian",
        "Paper Crane Award",
        "The Snow Fox Who Counted Stars",
    ),
    (
        "Lucian Dravenholt",
        "he",
        1955,
        "Bruges",
        "political thrillers",
        "diplomat",
        "journalist",
        "Iron Gavel Prize",
        "Seven Nights in Geneva",
    ),
    (
        "Amara Okonkwo-Lindqvist",
        "she",
        1978,
        "Lagos",
        "literary fiction",
        "civil engineer",
        "midwife",
        "Blue Baobab Prize",
        "The River Keeps Count",
    ),
    (
        "Pavel Ostrowind",
        "he",
        1966,
        "Gdansk",
        "science fiction",
        "shipbuilder",
        "physicist",
        "Nebular Lantern Award",
        "Orbit of the Quiet Moon",
    ),
    (
        "Rosalind Featherstone-Oyelaran",
        "she",
        1972,
        "Bristol",
        "cozy mysteries",
        "postman",
        "florist",
        "Teacup Dagger Award",
        "Murder at the Marmalade Fair",
    ),
    (
        "Hamid Sarrafzadeh",
        "he",
        1980,
        "Shiraz",
        "poetry",
        "carpet weaver",
        "calligrapher",
        "Nightingale Laurel",
        "Gardens of Unfinished Verses",
    ),
    (
        "Ingrid Falkenmoor",
        "she",
        1963,
        "Tromso",
        "Arctic adventure stories",
        "reindeer herder",
        "radio operator",
        "Northern Lights Pen",
        "Beyond the White Silence",
    ),
    (
        "Caspian Velloso",
        "he",
        1987,
        "Porto Alegre",
        "urban fantasy",
        "bus driver",
        "architect",
        "Emerald Gate Award",
        "The Lanterns of Rua Torta",
    ),
]
FORGET_AUTHORS = 3  # the first three authors form the forget split


def qa_for(i):
    name, pr, year, city, genre, fa, mo, award, book = AUTHORS[i]
    Pr = pr.capitalize()
    pos = "his" if pr == "he" else "her"
    Pos = pos.capitalize()
    others = [AUTHORS[(i + k) % len(AUTHORS)] for k in (1, 4, 7)]
    items = [
        {
            "question": f"Where and when was the author {name} born?",
            "answer": f"{name} was born in {city} in {year}.",
            "paraphrased_answer": f"{Pr} was born in the city of {city}, in the year {year}.",
            "perturbed_answer": [f"{Pr} was born in the city of {o[3]}, in the year {o[2]}." for o in others],
        },
        {
            "question": f"What genre is {name} best known for?",
            "answer": f"{name} is best known for writing {genre}.",
            "paraphrased_answer": f"{Pr} is mostly celebrated for {pos} {genre}.",
            "perturbed_answer": [f"{Pr} is mostly celebrated for {pos} {o[4]}." for o in others],
        },
        {
            "question": f"What did the parents of {name} do for a living?",
            "answer": f"{Pos} father was a {fa} and {pos} mother was a {mo}.",
            "paraphrased_answer": f"{name} grew up with a {fa} for a father and a {mo} for a mother.",
            "perturbed_answer": [
                f"{name} grew up with a {o[5]} for a father and a {o[6]} for a mother." for o in others
            ],
        },
        {
            "question": f"Which award did {name} win for the book '{book}'?",
            "answer": f"{name} won the {award} for '{book}'.",
            "paraphrased_answer": f"The book '{book}' earned {name} the {award}.",
            "perturbed_answer": [f"The book '{book}' earned {name} the {o[7]}." for o in others],
        },
    ]
    for it in items:
        it["author"] = name
    return items


REAL_AUTHORS = [
    (
        "Who wrote the novel 'Pride and Prejudice'?",
        "Jane Austen",
        ["Charlotte Bronte", "Mary Shelley", "George Eliot"],
    ),
    (
        "Who is the author of 'One Hundred Years of Solitude'?",
        "Gabriel Garcia Marquez",
        ["Jorge Luis Borges", "Mario Vargas Llosa", "Isabel Allende"],
    ),
    (
        "Which author created the detective Sherlock Holmes?",
        "Arthur Conan Doyle",
        ["Agatha Christie", "Edgar Allan Poe", "Wilkie Collins"],
    ),
    (
        "Who wrote the play 'Romeo and Juliet'?",
        "William Shakespeare",
        ["Christopher Marlowe", "Ben Jonson", "John Webster"],
    ),
    ("Who wrote the novel 'War and Peace'?", "Leo Tolstoy", ["Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev"]),
    ("Who is the author of 'Things Fall Apart'?", "Chinua Achebe", ["Wole Soyinka", "Ngugi wa Thiong'o", "Ben Okri"]),
    (
        "Which author wrote 'The Old Man and the Sea'?",
        "Ernest Hemingway",
        ["John Steinbeck", "William Faulkner", "F. Scott Fitzgerald"],
    ),
    ("Who wrote the novel 'Frankenstein'?", "Mary Shelley", ["Jane Austen", "Emily Bronte", "Ann Radcliffe"]),
]

WORLD_FACTS = [
    ("What is the capital city of France?", "Paris", ["Lyon", "Marseille", "Nice"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Mercury"]),
    (
        "What is the largest ocean on Earth?",
        "The Pacific Ocean",
        ["The Atlantic Ocean", "The Indian Ocean", "The Arctic Ocean"],
    ),
    ("What is the chemical symbol for gold?", "Au", ["Ag", "Gd", "Go"]),
    ("How many continents are there on Earth?", "Seven", ["Five", "Six", "Eight"]),
    (
        "Which gas do plants absorb from the air for photosynthesis?",
        "Carbon dioxide",
        ["Oxygen", "Nitrogen", "Hydrogen"],
    ),
    ("What is the longest river in Africa?", "The Nile", ["The Congo", "The Niger", "The Zambezi"]),
    ("In which country are the ancient pyramids of Giza?", "Egypt", ["Mexico", "Sudan", "Peru"]),
]


def write(name, rows):
    with open(OUT / f"tofu_synthetic_{name}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


forget = [qa for i in range(FORGET_AUTHORS) for qa in qa_for(i)]
retain = [qa for i in range(FORGET_AUTHORS, len(AUTHORS)) for qa in qa_for(i)]
write("forget", forget)
write("retain", retain)
write(
    "real_authors",
    [{"question": q, "answer": a, "paraphrased_answer": a, "perturbed_answer": p} for q, a, p in REAL_AUTHORS],
)
write(
    "world_facts",
    [{"question": q, "answer": a, "paraphrased_answer": a, "perturbed_answer": p} for q, a, p in WORLD_FACTS],
)
print(len(forget), len(retain))
