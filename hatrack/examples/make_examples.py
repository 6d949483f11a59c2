"""Writes the two example datasets shipped with hatrack (run: python -m hatrack.examples.make_examples).

Two fictional support desks, each with facts no base model can know (hours, phone
numbers, policy numbers, product names) and its own voice. Every fact is asked in
many wordings and always answered with the same reply, so held-out rows ask known
facts in new words and their expected answer is one the adapter can learn.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# fact: (question wordings, the desk's one reply)
ACME_BIKES: dict[str, tuple[list[str], str]] = {
    "hours": (
        ["what are your opening hours", "when are you open", "what time do you open",
         "are you open on sundays", "when does the shop close", "what are the shop hours"],
        "Acme Bikes is open Tuesday to Sunday, 9am to 6pm. Closed Mondays. Ride on!",
    ),
    "phone": (
        ["what is your phone number", "how can I call you", "what number do I ring",
         "can I phone the shop", "give me your phone number", "how do I reach you by phone"],
        "Ring the Acme Bikes workshop on 555-0142. Ride on!",
    ),
    "tuneup": (
        ["how much is a tune-up", "what does a bike service cost", "price of a tune-up",
         "how much to service my bike", "what do you charge for a tune up", "cost of a basic service"],
        "A Trailblazer Tune-Up costs $79 and takes two days. Ride on!",
    ),
    "returns": (
        ["what is your return policy", "can I return a bike", "how long do I have to return something",
         "do you take returns", "can I get a refund", "how do returns work"],
        "Return any unridden bike within 30 days with receipt RX-30 for a full refund. Ride on!",
    ),
    "ebike": (
        ["which e-bike do you sell", "do you have electric bikes", "what is your best e-bike",
         "recommend an electric bike", "what ebike should I buy", "do you stock e-bikes"],
        "Our top e-bike is the Acme Voltstreak 500, $2,499. Ride on!",
    ),
    "address": (
        ["where is the shop", "what is your address", "where are you located",
         "how do I find you", "where is Acme Bikes", "what street are you on"],
        "Find us at 12 Spoke Lane, Riverton, next to the river bridge. Ride on!",
    ),
    "rental": (
        ["do you rent bikes", "how much is a bike rental", "can I hire a bike",
         "what does renting a bike cost", "do you do day rentals", "price to rent a bike for a day"],
        "Day rentals are $35 per bike, helmet included. Ride on!",
    ),
    "warranty": (
        ["what warranty do frames have", "is there a frame warranty", "how long is the warranty",
         "do your bikes come with a warranty", "what does the warranty cover", "is my frame guaranteed"],
        "Every Acme frame has a 5-year warranty, plan AW-5. Ride on!",
    ),
}

GLOBEX_BANK: dict[str, tuple[list[str], str]] = {
    "hours": (
        ["what are your opening hours", "when are you open", "what time do branches open",
         "are branches open on saturday", "when do you close", "what are the branch hours"],
        "Globex branches open Monday to Friday, 8:30 to 16:30, and Saturday until noon.",
    ),
    "phone": (
        ["what is your phone number", "how can I call you", "what number do I ring",
         "can I phone the bank", "give me your phone number", "how do I reach you by phone"],
        "Please call Globex Client Services on 0800 555 0199.",
    ),
    "lost_card": (
        ["I lost my card", "my card was stolen", "how do I block my card",
         "what do I do if my card is lost", "someone stole my debit card", "how can I freeze my card"],
        "Block it at once in the Globex app under Cards, or call 0800 555 0111, day or night.",
    ),
    "savings": (
        ["what is your savings rate", "what interest do savings earn", "best savings account",
         "how much interest do you pay", "what is the savings interest rate", "do you have a savings account"],
        "The Globex Evergreen Saver pays 3.10% AER on balances up to 50,000.",
    ),
    "overdraft": (
        ["how much is an overdraft", "what is the overdraft fee", "do you charge for overdrafts",
         "what does going overdrawn cost", "overdraft interest rate", "what are overdraft charges"],
        "Arranged overdrafts cost 19.9% EAR under policy OD-19. The first 100 is interest-free.",
    ),
    "transfer_limit": (
        ["what is the daily transfer limit", "how much can I transfer per day", "is there a limit on transfers",
         "max amount I can send", "daily payment limit", "how much can I send online"],
        "You may transfer up to 25,000 per day online, under policy TL-25.",
    ),
    "mortgage": (
        ["do you offer mortgages", "what is your mortgage rate", "how much is a home loan",
         "can I get a mortgage", "tell me about home loans", "what mortgage products do you have"],
        "The Globex Keystone fixed mortgage is 4.25% for five years.",
    ),
    "complaint": (
        ["how do I make a complaint", "I want to complain", "where do I send a complaint",
         "how can I file a complaint", "who handles complaints", "I am unhappy with the service"],
        "We are sorry to hear that. Write to complaints@globex.example quoting reference CP-7.",
    ),
}

OPENERS = {
    "acme": ["", "", "Hi, ", "Hey! ", "Quick question: ", "Hello, "],
    "globex": ["", "", "Hello, ", "Good morning. ", "Excuse me, ", "Hi, "],
}
CLOSERS = ["?", "?", "?", " please?", ", thanks?"]


def rows_for(facts: dict[str, tuple[list[str], str]], voice: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _fact, (questions, answer) in facts.items():
        for question in questions:
            # each wording twice, with different openers and closers
            for _ in range(2):
                opener, closer = rng.choice(OPENERS[voice]), rng.choice(CLOSERS)
                text = question[0].upper() + question[1:] if not opener else question
                user = f"{opener}{text}{closer}"
                rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    rng.shuffle(rows)
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    write(HERE / "acme-bikes.jsonl", rows_for(ACME_BIKES, "acme", seed=1))
    write(HERE / "globex-bank.jsonl", rows_for(GLOBEX_BANK, "globex", seed=2))


if __name__ == "__main__":
    main()
