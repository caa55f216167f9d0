"""Word lists behind `data.clipart`'s captions: which words name a drawable thing, which describe one.

openclipart's titles mix English with Italian and French, file-ish tokens and collection names, and the
machine has no dictionary, so the caption builder only trusts words listed here. The lists were written by
reading every title and keyword word of the `openclipart-svg` 0.18 package (about 3,200 distinct words):
a word is a NOUN when a person could point at it in a picture, an ADJECTIVE when it says how the thing
looks. Anything else (place names, people's names, jargon, foreign words not translated below) is not
used; a title with none of these words falls back to its keywords, and a file with none is dropped.
"""

from __future__ import annotations


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Specific things: a caption's head noun. Compounds that are one thing ("hot dog") are in PHRASES below.
NOUNS = _words("""
    ant angelfish antelope armadillo bat bear beagle bee beetle bison bull bulldog bunny butterfly camel cat
    caterpillar chick chicken chimp chipmunk cichlid cobra cow crab crawfish crocodile crow damselfly deer
    dinosaur dog dolphin donkey dragon dragonfly duck eagle echidna elephant elk fawn fox frog gecko giraffe
    goat goldfish gorilla gourami grasshopper gull hedgehog hen hippo horse ibex kangaroo kitten koala
    ladybug lamb lion lizard lobster mandrill mantis monkey moose mosquito mouse mule octopus orca ostrich
    owl panda parrot peacock pelican penguin pig pigeon puppy rabbit raccoon ram rat reindeer retriever
    rhinoceros rooster seagull seal shark sheep snail snake spider squirrel starfish swan tiger toad tortoise
    turkey turtle unicorn wasp whale wolf worm zebra
    alien angel astronaut baby ballerina boy bride chef child clown cowboy dancer doctor elf fairy fireman
    girl groom guy hiker king kid knight lady man mermaid monster ninja nurse pilot pirate
    policeman princess prince queen robot sailor santa skier soldier stickman surgeon teenager troll
    witch wizard woman
    arm beard body bone brain ear eye face finger fist foot footprint hair hand head heart leg lips
    moustache mouth nose skeleton skull teeth thumb tooth
    smiley silhouette bust statue portrait
    apple apricot bacon banana bread broccoli burger burrito butter cake candy carrot cheese cherry chili
    chocolate coconut cookie corn croissant cupcake doughnut egg fondue fries garlic grape hamburger
    lasagna lemon lemonade lettuce lime lollipop marshmallow meat melon muffin mushroom olive onion
    pancake pasta peach pear pepper pie pineapple pizza plum popcorn potato pretzel prune pudding pumpkin
    radish salad salami sandwich sausage spaghetti steak strawberry sundae toast tomato watermelon
    beer cocktail coffee juice martini milk soda tea water wine
    acorn bamboo bouquet branch bush cactus daffodil daisy fern geranium grass holly leaf lily
    magnolia mistletoe orchid palm pansy rose shamrock sunflower toadstool tree tulip vine
    airplane aircraft ambulance bicycle bike boat bus canoe car helicopter jeep kayak lorry motorcycle
    plane rocket sailboat schooner scooter ship shuttle submarine tank taxi tractor train tram trawler
    truck van wagon yacht
    accordion banjo bell cello clarinet drum flute guitar harp maraca oboe piano piccolo saxophone
    tambourine trombone trumpet tuba violin xylophone
    anchor antenna axe backpack badge bag ball balloon banner barrel baseball basket battery bed bench bin
    binoculars blender board bomb book bookmark boombox boomerang boot bottle bow bowl box bracelet brick
    broom brush bucket bulb button cabinet cage calculator calendar camcorder camera candle cannon cap card
    cart cassette chain chair chalkboard chess clipboard clock coat coin comb compass computer cone
    couch crayon crown cube cup dartboard desk diamond dice dish door dresser drill dumbbell earring
    envelope eraser fan fence firecracker fireworks flashlight floppy flowerpot folder fork frame gear gem
    gift glass glasses globe glove hammer hanger hat helmet hook hourglass hydrant iron jar jigsaw
    joystick kettle key keyboard kite knife knot ladder lamp lantern laptop lens letter lifebelt lightbulb
    lipstick lock loupe magnet magnifier mailbox map mask medal megaphone microchip microphone microscope
    mirror mitten monitor mug nail necklace needle newspaper notebook padlock paintbrush palette pan paper
    paperclip parachute pen pencil phone piggybank pill pillow pin pipe pitcher plate platter plug pot
    present printer projectile puzzle racket radio rake ribbon ring rope ruler saddle sandal saw
    scale scanner scissors screen screwdriver scroll shield shirt shoe shorts shovel skateboard ski
    sled sledge sneaker snowflake soap sock sofa speaker spoon spyglass stamp stapler stethoscope
    gun stool suitcase sunglasses surfboard sword syringe table tambourine tape teacup teapot telephone
    telescope television tent thermometer ticket tie tire toaster toilet toothbrush toothpaste torch
    towel trophy trowel tshirt tv umbrella vase wallet wand watch wheel wheelchair whistle wrench
    wreath
    barn bridge cabin castle chalet church factory fountain house hut igloo lighthouse mosque
    pyramid school skyscraper temple tower windmill
    beach cloud comet desert earth landscape flame fire hill island lake lightning moon mountain planet rainbow
    river rock snow snowman star sun sunset volcano wave
    arrow circle heart square triangle
    armchair barcode capacitor certificate chessboard clef crayon diode disc drop feather flask gemstone
    horn jukebox medal page pantyhose quilt racquet record resistor sandcastle stamp stopwatch thumbtack
    transistor trophy
    """)

# Broad classes: true of the picture but vague. Used only when a file names nothing more specific.
BROAD_NOUNS = _words("""
    animal bird insect fish reptile flower fruit vegetable plant dessert drink vehicle tool weapon toy
    building person sign symbol
    """)
# The broad nouns that make a caption on their own ("a bird"); "a sign" or "a symbol" says nothing about
# the picture, so those only stand with a word before them ("a peace symbol").
BROAD_ALONE = BROAD_NOUNS - {"sign", "symbol"}
# Broad keywords said more plainly ("mammal" is true of a cheetah, "an animal" is what a person says).
BROAD_ALIASES = {"mammal": "animal", "feline": "animal", "canine": "animal", "beverage": "drink",
                 "bug": "insect", "human": "person"}

# People: a colour word before them would read as skin colour (see data.clipart.with_colour).
PEOPLE_NOUNS = _words("man woman boy girl baby child kid lady guy person teenager bride groom king queen prince "
                      "princess nurse doctor chef pilot sailor soldier dancer hiker skier surgeon fireman "
                      "policeman cowboy astronaut ballerina")

# Words a caption may use before a noun, besides colours (adjective order: these come before the colour).
ADJECTIVES = _words("""
    angry big bored broken female male closed crazy crying cute dancing empty fancy fat flying full funny giant happy
    hot hungry jumping laughing little long old open pretty round running sad scary shiny sitting sleeping
    small smiling spicy spiky standing striped sweet tall tiny tropical walking whole wild young
    """)

# Nouns that only modify another noun here ("soccer ball", "christmas tree"); never a caption's head.
MODIFIERS = _words("""
    basketball football golf hockey rugby soccer tennis volleyball billiard bowling yoga karate
    christmas easter halloween birthday wedding valentine party summer winter kitchen office police
    postage plastic metal stone silk wooden peace music musical chemistry space sea
    """)

# Colour words of titles; the measured colour in a caption is one of COLOURS in data.clipart.
COLOUR_WORDS = _words("red orange yellow green blue purple pink brown black white gray grey gold golden silver "
                      "violet beige")

NUMBER_WORDS = _words("two three four five six seven eight nine ten")

# Connectors kept inside a title phrase ("a cup of coffee", "a girl with a balloon").
CONNECTORS = _words("of with and in on a an")

# Nouns without "a"/"an" ("milk", not "a milk").
MASS_NOUNS = _words("""
    bacon bread butter cheese chocolate coffee corn fire fireworks fries grass juice lasagna lemonade
    lettuce lightning meat milk paper pasta popcorn salad snow soda spaghetti tea water wine
    """)

# Nouns said with "the" ("the earth").
THE_NOUNS = _words("earth")

# Plural forms that the simple "+s/+es/ies" rule does not find, and singulars that end in s.
IRREGULAR_PLURALS = {"men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
                     "teeth": "tooth", "mice": "mouse", "leaves": "leaf", "knives": "knife", "geese": "goose",
                     "dice": "dice", "sheep": "sheep", "fish": "fish", "deer": "deer", "glasses": "glasses",
                     "pantyhose": "pantyhose",
                     "scissors": "scissors", "binoculars": "binoculars", "shorts": "shorts",
                     "fireworks": "fireworks", "fries": "fries", "maracas": "maraca", "dominoes": "domino"}
ALWAYS_PLURAL = _words("scissors binoculars glasses sunglasses shorts fireworks fries maracas dice lips pantyhose "
                       "crossbones")

# Several title words that name one thing; they are read as one noun.
PHRASES = {
    "hot dog": "hot dog", "ice cream": "ice cream", "icecream": "ice cream", "teddy bear": "teddy bear",
    "teddybear": "teddy bear", "stick man": "stick man", "stickman": "stick man", "stickmen": "stick man",
    "floppy disk": "floppy disk", "floppydisk": "floppy disk", "light bulb": "light bulb",
    "lightbulb": "light bulb", "magnifying glass": "magnifying glass", "magnifier": "magnifying glass",
    "loupe": "magnifying glass", "traffic light": "traffic light", "fire engine": "fire truck",
    "fireengine": "fire truck", "fire truck": "fire truck", "fire hydrant": "fire hydrant",
    "palm tree": "palm tree", "palmtree": "palm tree", "christmas tree": "christmas tree",
    "soft drink": "soft drink", "softdrink": "soft drink", "cell phone": "cell phone",
    "cellphone": "cell phone", "mobile phone": "cell phone", "sports car": "sports car",
    "sportcar": "sports car", "race car": "race car", "piggy bank": "piggy bank",
    "piggybank": "piggy bank", "test tube": "test tube", "hot air balloon": "hot air balloon",
    "jigsaw": "jigsaw piece", "jigsaw piece": "jigsaw piece", "playing card": "playing card",
    "tshirt": "t-shirt", "tv": "television", "dino": "dinosaur", "bike": "bicycle", "cuppa": "cup of tea",
    "music note": "music note", "musical note": "music note", "treble clef": "treble clef",
    "gas mask": "gas mask", "top hat": "top hat", "tophat": "top hat", "space shuttle": "space shuttle",
    "road sign": "road sign", "roadsign": "road sign", "stop sign": "stop sign", "light house": "lighthouse",
    "sail boat": "sailboat", "race horse": "racehorse", "sea gull": "seagull", "lady bug": "ladybug",
    "paint brush": "paintbrush", "tooth brush": "toothbrush", "wine glass": "wine glass",
    "coffee cup": "coffee cup", "beer mug": "beer mug", "gift box": "gift box", "snow man": "snowman",
    "santa claus": "santa claus", "father christmas": "santa claus", "fatherchristmas": "santa claus",
    "jack o lantern": "jack-o'-lantern", "firestation": "fire station", "fire station": "fire station",
    "paperbag": "paper bag", "paper bag": "paper bag", "thumbs up": "thumbs-up hand",
    "crossbones": "skull and crossbones",
    "skull and crossbones": "skull and crossbones", "callout": "speech bubble", "speech bubble": "speech bubble",
    "compact disc": "compact disc", "cd": "compact disc", "football pitch": "football field",
    "yin yang": "yin and yang symbol", "jin jang": "yin and yang symbol", "french horn": "french horn",
    "quaver": "music note", "treble staff": "music staff", "chess": "chess piece", "chess piece": "chess piece",
    "chess board": "chessboard", "chessboard": "chessboard", "bar code": "barcode",
    "grass hopper": "grasshopper",
    "satellite dish": "satellite dish", "shoe print": "shoe print", "pallone aerestatico": "hot air balloon",
    "pallone aerostatico": "hot air balloon", "ruota dentata": "gear", "shopping cart": "shopping cart",
    "ice cube": "ice cube",
    "penny": "coin", "orange wedge": "orange wedge", "orange slice": "orange slice",
    "orange juice": "orange juice", "oranges": "oranges", "stamper": "rubber stamp", "dossier": "folder",
    "biohazard": "biohazard symbol", "ladybird": "ladybug", "sand castle": "sandcastle",
    "macchina fotografica": "camera", "macchina caffe": "coffee machine", "ferro da stiro": "iron",
    "aeroplane": "airplane", "automobile": "car", "auto": "car", "telly": "television",
    "bullet hole": "bullet hole", "longsword": "sword", "nodding donkey": "oil pump", "oil pump": "oil pump",
}

# Italian, French and Spanish title words of the package, translated (head nouns and a few colours).
# The titles put the noun first ("Cigno di notte nella palude": a swan at night in the marsh).
TRANSLATIONS = {
    "antilope": "antelope", "paprika": "pepper", "autos": "cars",
    "acquila": "eagle", "aquila": "eagle", "cigno": "swan", "cigni": "swans", "gallo": "rooster",
    "gallina": "hen", "uccello": "bird", "uccelli": "birds", "gabbiano": "seagull", "gufo": "owl",
    "civetta": "owl", "pinguino": "penguin", "tacchino": "turkey", "farfalla": "butterfly",
    "farfalle": "butterflies", "papillon": "butterfly", "formicona": "ant", "formichina": "ant",
    "lumaca": "snail", "moschito": "mosquito", "zanzara": "mosquito", "ragno": "spider", "ragnetto": "spider",
    "coccinella": "ladybug", "coccinellona": "ladybug", "coccinelle": "ladybug", "cavalletta": "grasshopper",
    "libellula": "dragonfly", "libellule": "dragonfly", "mantide": "mantis", "abeille": "bee",
    "insetto": "insect", "orso": "bear", "ours": "bear", "leone": "lion", "tigre": "tiger", "tigri": "tigers",
    "coniglio": "rabbit", "elefante": "elephant", "elefant": "elephant", "olifant": "elephant",
    "cavallo": "horse", "gatto": "cat", "gatti": "cats", "gattina": "kitten", "cani": "dogs", "cane": "dog",
    "pecora": "sheep", "pecorella": "lamb", "rana": "frog", "lucertola": "lizard", "lucertolone": "lizard",
    "lucertolona": "lizard", "ramarro": "lizard", "dinosauro": "dinosaur", "dinosauri": "dinosaurs",
    "vacca": "cow", "mucca": "cow", "toro": "bull", "pesce": "fish", "pescetto": "fish", "canguro": "kangaroo",
    "pollo": "chicken", "cochon": "pig", "porcinet": "pig", "stambecco": "ibex", "topo": "mouse",
    "torta": "cake", "gateau": "cake", "pesca": "peach", "aglio": "garlic", "zucca": "pumpkin", "pera": "pear",
    "pere": "pear", "prugna": "plum", "pomodori": "tomatoes", "ravanello": "radish", "pannocchia": "corn",
    "gelato": "ice cream", "glace": "ice cream", "birra": "beer", "vino": "wine", "bottiglia": "bottle",
    "teiera": "teapot", "tazza": "cup", "champignon": "mushroom", "pasteque": "watermelon",
    "clessidra": "hourglass", "microscopio": "microscope", "lampada": "lamp", "binocolo": "binoculars",
    "ruota": "wheel", "pentola": "pot", "cacciavite": "screwdriver", "telefono": "telephone",
    "televisore": "television", "orologio": "clock", "lettera": "letter", "carta": "paper",
    "poltrona": "armchair", "tavolo": "table", "sedia": "chair", "casa": "house", "maison": "house",
    "fabbrica": "factory", "libro": "book", "borsa": "bag", "dente": "tooth", "palloncini": "balloons",
    "pallone": "ball", "bicicletta": "bicycle", "tenda": "tent", "cubo": "cube", "calcolatrice": "calculator",
    "secchio": "bucket", "scodella": "bowl", "sapone": "soap", "provette": "test tubes", "provetta": "test tube",
    "stampante": "printer", "microfono": "microphone", "valigie": "suitcases", "fiore": "flower",
    "fiori": "flowers", "albero": "tree", "arbre": "tree", "sapin": "fir tree", "foglie": "leaves",
    "trattore": "tractor", "nonno": "grandfather", "ragazza": "girl", "principessa": "princess",
    "donna": "woman", "uomo": "man", "bambina": "girl", "soleil": "sun", "sonne": "sun", "nuage": "cloud",
    "voiture": "car", "teschio": "skull", "pettine": "comb", "forbici": "scissors", "spugna": "sponge",
    "siringa": "syringe", "pennello": "paintbrush", "padella": "pan", "bussola": "compass",
    "lucchetto": "padlock", "calamita": "magnet", "regalo": "gift", "cesto": "basket", "sacco": "sack",
    "cronometro": "stopwatch", "camicia": "shirt", "seta": "silk", "couronne": "crown", "schermo": "screen",
    "livella": "spirit level", "cartes": "cards", "cappello": "hat", "scarpa": "shoe", "chitarra": "guitar",
    "rosso": "red", "rossa": "red", "verde": "green", "giallo": "yellow", "bianco": "white", "nero": "black",
    "grigio": "gray", "grigia": "gray", "arancione": "orange",
}

# Words that make a title not a caption: meta words about the file, removed wherever they appear.
META_WORDS = _words("""
    clipart cliparts clip art icon icons iconset svg vector vectorized illustration drawing image picture
    graphic graphics sketch version copy sodipodi inkscape openclipart bw b&w hash stylized stylised
    simple simplified""")
