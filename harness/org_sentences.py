"""Hand-written English sentences naming companies, brands and products, many of them named
after people or shaped like a name ("Morgan Stanley", "Ford Mustang", "Calvin Klein"):
none holds a person, so every PERSON found is a false positive (issue #34).
"""

from __future__ import annotations

ORG_SENTENCES = (
    "The Morgan Stanley report mentions Goldman Sachs.",
    "Ford Mustang sales rose in March.",
    "Wells Fargo shares fell after the earnings call.",
    "We moved our savings from Charles Schwab to Vanguard.",
    "Ralph Lauren stores will close early on Sunday.",
    "The Calvin Klein campaign ran on every billboard downtown.",
    "Tommy Hilfiger jackets are on sale this week.",
    "Louis Vuitton bags were stolen from the display.",
    "Estee Lauder revenue beat expectations.",
    "The Hewlett Packard printer jammed again.",
    "Procter & Gamble raised its prices in Europe.",
    "Lockheed Martin won the contract for the new jets.",
    "Ernst & Young audited the accounts last year.",
    "Dolce & Gabbana opened a boutique in Milan.",
    "Hugo Boss suits are expensive.",
    "Kate Spade handbags sold out quickly.",
    "The Michael Kors watch stopped working after a week.",
    "Harley Davidson motorcycles are loud.",
    "Aston Martin profits dropped sharply.",
    "A Rolls Royce engine failed on the test stand.",
    "The Mercedes Benz dealership offered a discount.",
    "Chevrolet Camaro owners reported a recall.",
    "The Dodge Charger is popular with police departments.",
    "Toyota Camry prices went up in April.",
    "Honda Civic insurance is cheap.",
    "The Jeep Cherokee needs new tires.",
    "Nissan Leaf batteries degrade slowly.",
    "Tesla Model Y deliveries doubled.",
    "The Kia Sorento has seven seats.",
    "Lincoln Navigator sales fell last quarter.",
    "Jack Daniels whiskey prices rose.",
    "Johnnie Walker launched a new blend.",
    "We ordered Dr Pepper for the party.",
    "Mary Kay cosmetics are sold door to door.",
    "Ann Taylor outlets are closing.",
    "Trader Joe's stock is always fresh.",
    "John Deere tractors are built in Iowa.",
    "The Dow Jones index closed higher.",
    "JPMorgan Chase fined for reporting failures.",
    "Edward Jones advisors met with clients on Monday.",
    "Raymond James analysts upgraded the stock.",
    "Merrill Lynch was acquired during the crisis.",
    "Franklin Templeton funds lost value.",
    "Lehman Brothers collapsed in 2008.",
    "Warner Bros announced a new film.",
    "Walt Disney earnings will be released tomorrow.",
    "Marks & Spencer food sales grew.",
    "Johnson & Johnson recalled a batch of sunscreen.",
    "Ben & Jerry's ice cream melted in the truck.",
    "Tiffany rings are on display in the window.",
    "The Dell laptop overheated during the demo.",
    "Kellogg cereal boxes were redesigned.",
    "Wendy's burgers are cheaper this month.",
    "Dunkin Donuts coffee costs two dollars.",
    "Martha Stewart Living magazine changed its format.",
    "The Jimmy Choo shoes arrived damaged.",
    "Victoria Secret catalogs are no longer printed.",
    "Alfa Romeo Giulia reviews are positive.",
    "Porsche Cayenne sales slowed in China.",
    "The Ford Focus recall affected thousands of cars.",
    "Smith Barney brokers moved to a new office.",
    "Sherwin Williams paint is on sale.",
    "Charles River Laboratories hired new staff.",
    "Marriott hotels raised their rates.",
)


def masked_as_person(detect) -> list[tuple[str, list[str]]]:  # noqa: ANN001 - a callable
    """The sentences where ``detect`` finds a PERSON, with what it found."""
    out = []
    for text in ORG_SENTENCES:
        found = [text[s.start:s.end] for s in detect(text) if s.entity == "PERSON"]
        if found:
            out.append((text, found))
    return out
