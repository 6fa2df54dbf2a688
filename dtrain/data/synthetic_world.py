"""The built-in data set's world: its categories, attributes, places and caption templates.

Pure data (synthetic_scenes.py draws from it, synthetic.py writes the files). Changing a
table changes every generated data set: bump ``VERSION`` with it, which renames the
cached copies.
"""

VERSION = 1
FEATURE_DIM = 512
CAPTION_SLOTS = 17
MIN_WORDS, MAX_WORDS = 8, CAPTION_SLOTS - 2
CAPTIONS_PER_IMAGE = 5
WORLD_SEED = 2014  # the embedding of concepts; fixed so every seed samples one world

# --- the world --------------------------------------------------------------
# A synonym list may end in rare forms marked with "*": drawn 4% of the time. Most of
# those are outside the COCO vocabulary and become <UNK>.

ACTIONS = {
    "standing": ["standing", "posing"], "sitting": ["sitting", "seated", "resting"],
    "walking": ["walking"], "running": ["running", "jogging*"], "playing": ["playing"],
    "eating": ["eating"], "talking": ["talking"], "smiling": ["smiling"],
    "grazing": ["grazing", "eating grass"], "laying": ["laying down", "lying down", "laying"],
    "sleeping": ["sleeping", "napping*"], "parked": ["parked"],
    "driving": ["driving", "traveling", "moving"], "stopped": ["stopped", "waiting"],
    "flying": ["flying", "soaring*"], "landing": ["landing", "taking off"],
    "floating": ["floating", "docked"], "placed": ["sitting", "placed", "resting"],
    "displayed": ["displayed", "shown"], "hanging": ["hanging"], "served": ["served", "ready"],
    "sliced": ["sliced", "cut"],
}

PLACES = {
    "street": ["on a street", "on the street", "on a city street", "on the road"],
    "field": ["in a field", "on the grass", "in a grassy field"],
    "park": ["in a park", "at the park"],
    "beach": ["on the beach", "on the sand", "near the ocean", "by the water"],
    "snow": ["in the snow", "on a snowy hill", "on the snow"],
    "kitchen": ["in a kitchen", "in the kitchen"],
    "table": ["on a table", "on top of a table", "on a wooden table"],
    "room": ["in a room", "in a living room", "in the living room"],
    "bedroom": ["in a bedroom", "in the bedroom"],
    "bathroom": ["in a bathroom", "in the bathroom"],
    "airport": ["at an airport", "on the runway", "on the tarmac"],
    "sky": ["in the sky", "in the air", "through the sky"],
    "station": ["at a station", "on the tracks", "at the train station"],
    "water": ["in the water", "on the water", "on a lake", "on the river"],
    "zoo": ["at the zoo", "in an enclosure", "in a zoo enclosure"],
    "forest": ["in the woods", "in a forest"],
    "counter": ["on a counter", "on the kitchen counter"],
    "plate": ["on a plate", "on a tray", "on a dish"],
    "desk": ["on a desk", "in an office", "on an office desk"],
    "market": ["at a market", "at the market"],
    "restaurant": ["in a restaurant", "at a restaurant"],
    "yard": ["in a yard", "in the yard", "in the backyard*"],
    "court": ["on a tennis court", "on the court"],
    "hill": ["on a hill", "on a mountain", "on a slope"],
    "parking": ["in a parking lot", "in the lot"],
    "sidewalk": ["on the sidewalk", "by the curb", "near the sidewalk"],
    "dock": ["at the dock", "near a pier"],
}

# group: (actions, places)
GROUPS = {
    "person": (["standing", "sitting", "walking", "running", "playing", "eating", "talking",
                "smiling"],
               ["street", "field", "park", "beach", "snow", "kitchen", "room", "court",
                "restaurant", "market"]),
    "animal": (["standing", "walking", "grazing", "laying", "running", "sleeping"],
               ["field", "park", "zoo", "forest", "beach", "yard", "street"]),
    "vehicle": (["parked", "driving", "stopped"], ["street", "parking", "sidewalk", "hill"]),
    "aircraft": (["flying", "parked", "landing"], ["airport", "sky"]),
    "rail": (["driving", "stopped", "parked"], ["station"]),
    "boat": (["floating", "parked"], ["water", "dock", "beach"]),
    "street": (["standing", "placed"], ["street", "sidewalk", "park"]),
    "food": (["placed", "served", "displayed", "sliced"],
             ["table", "plate", "counter", "restaurant", "market"]),
    "household": (["placed", "displayed", "hanging"],
                  ["table", "room", "kitchen", "bedroom", "bathroom", "desk", "counter"]),
    "sport": (["placed", "laying", "hanging"], ["beach", "snow", "field", "park", "court"]),
    "electronic": (["placed", "displayed"], ["desk", "table", "room"]),
}

# name, group, singular forms, plural forms
CATEGORIES = [
    ("person", "person", ["man", "woman", "person"], ["people", "men", "women"]),
    ("child", "person", ["boy", "girl", "child", "kid"], ["children", "kids", "boys", "girls"]),
    ("bicycle", "vehicle", ["bicycle", "bike"], ["bicycles", "bikes"]),
    ("car", "vehicle", ["car", "vehicle", "automobile*"], ["cars", "vehicles"]),
    ("motorcycle", "vehicle", ["motorcycle", "motor bike", "motorbike*"], ["motorcycles"]),
    ("airplane", "aircraft", ["airplane", "plane", "jet", "airliner*"], ["airplanes", "planes"]),
    ("bus", "vehicle", ["bus", "city bus", "double decker bus"], ["buses"]),
    ("train", "rail", ["train", "passenger train", "commuter train"], ["trains"]),
    ("truck", "vehicle", ["truck", "pickup truck*"], ["trucks"]),
    ("boat", "boat", ["boat", "ship"], ["boats"]),
    ("traffic light", "street", ["traffic light", "traffic signal"], ["traffic lights"]),
    ("fire hydrant", "street", ["fire hydrant", "hydrant"], ["fire hydrants*"]),
    ("stop sign", "street", ["stop sign", "sign"], ["stop signs", "signs"]),
    ("parking meter", "street", ["parking meter", "meter"], ["parking meters*"]),
    ("bench", "street", ["bench", "park bench"], ["benches"]),
    ("bird", "animal", ["bird"], ["birds"]),
    ("cat", "animal", ["cat", "kitten"], ["cats"]),
    ("dog", "animal", ["dog", "puppy*"], ["dogs"]),
    ("horse", "animal", ["horse", "pony*"], ["horses"]),
    ("sheep", "animal", ["sheep"], ["sheep"]),
    ("cow", "animal", ["cow", "bull*"], ["cows", "cattle"]),
    ("elephant", "animal", ["elephant"], ["elephants"]),
    ("bear", "animal", ["bear", "polar bear"], ["bears"]),
    ("zebra", "animal", ["zebra"], ["zebras"]),
    ("giraffe", "animal", ["giraffe"], ["giraffes"]),
    ("backpack", "household", ["backpack"], ["backpacks*"]),
    ("umbrella", "street", ["umbrella"], ["umbrellas"]),
    ("handbag", "household", ["bag", "handbag*"], ["bags"]),
    ("tie", "household", ["tie", "neck tie"], ["ties"]),
    ("suitcase", "household", ["suitcase", "piece of luggage"], ["suitcases", "luggage"]),
    ("frisbee", "sport", ["frisbee"], ["frisbees*"]),
    ("skis", "sport", ["pair of skis", "skis"], ["skis"]),
    ("snowboard", "sport", ["snowboard"], ["snowboards*"]),
    ("sports ball", "sport", ["ball", "soccer ball", "tennis ball"], ["balls*"]),
    ("kite", "sport", ["kite"], ["kites"]),
    ("baseball bat", "sport", ["baseball bat", "bat"], ["bats*"]),
    ("baseball glove", "sport", ["baseball glove", "glove"], ["gloves*"]),
    ("skateboard", "sport", ["skateboard", "skate board"], ["skateboards"]),
    ("surfboard", "sport", ["surfboard", "surf board"], ["surfboards"]),
    ("tennis racket", "sport", ["tennis racket", "racket", "racquet"], ["rackets"]),
    ("bottle", "household", ["bottle", "bottle of wine"], ["bottles"]),
    ("wine glass", "household", ["wine glass", "glass"], ["wine glasses", "glasses"]),
    ("cup", "household", ["cup", "coffee cup", "mug*"], ["cups"]),
    ("fork", "household", ["fork"], ["forks*"]),
    ("knife", "household", ["knife"], ["knives*"]),
    ("spoon", "household", ["spoon"], ["spoons*"]),
    ("bowl", "household", ["bowl"], ["bowls"]),
    ("banana", "food", ["banana", "bunch of bananas"], ["bananas"]),
    ("apple", "food", ["apple"], ["apples"]),
    ("sandwich", "food", ["sandwich"], ["sandwiches"]),
    ("orange", "food", ["orange"], ["oranges"]),
    ("broccoli", "food", ["broccoli", "piece of broccoli"], ["broccoli"]),
    ("carrot", "food", ["carrot"], ["carrots"]),
    ("hot dog", "food", ["hot dog", "hotdog"], ["hot dogs"]),
    ("pizza", "food", ["pizza", "slice of pizza"], ["pizzas", "slices of pizza"]),
    ("donut", "food", ["donut", "doughnut"], ["donuts", "doughnuts"]),
    ("cake", "food", ["cake", "birthday cake", "cupcake*"], ["cakes"]),
    ("chair", "household", ["chair", "wooden chair"], ["chairs"]),
    ("couch", "household", ["couch", "sofa"], ["couches"]),
    ("potted plant", "household", ["potted plant", "plant"], ["plants", "potted plants"]),
    ("bed", "household", ["bed"], ["beds"]),
    ("dining table", "household", ["table", "dining table"], ["tables"]),
    ("toilet", "household", ["toilet"], ["toilets"]),
    ("tv", "electronic", ["television", "tv"], ["televisions*"]),
    ("laptop", "electronic", ["laptop", "laptop computer"], ["laptops"]),
    ("mouse", "electronic", ["computer mouse", "mouse"], ["mice*"]),
    ("remote", "electronic", ["remote", "remote control"], ["remotes*"]),
    ("keyboard", "electronic", ["keyboard"], ["keyboards*"]),
    ("cell phone", "electronic", ["cell phone", "phone", "cellphone"], ["phones", "cell phones"]),
    ("microwave", "household", ["microwave"], ["microwaves*"]),
    ("oven", "household", ["oven", "stove"], ["ovens*"]),
    ("toaster", "household", ["toaster*"], ["toasters*"]),
    ("sink", "household", ["sink"], ["sinks"]),
    ("refrigerator", "household", ["refrigerator", "fridge"], ["refrigerators*"]),
    ("book", "household", ["book"], ["books"]),
    ("clock", "street", ["clock", "clock tower"], ["clocks"]),
    ("vase", "household", ["vase", "vase of flowers"], ["vases"]),
    ("scissors", "household", ["pair of scissors", "scissors"], ["scissors"]),
    ("teddy bear", "household", ["teddy bear", "stuffed bear"], ["teddy bears", "stuffed animals"]),
    ("hair drier", "household", ["hair dryer*"], ["hair dryers*"]),
    ("toothbrush", "household", ["toothbrush"], ["toothbrushes*"]),
]

COLOURS = {
    "red": ["red", "crimson*"], "blue": ["blue"], "green": ["green"], "yellow": ["yellow"],
    "black": ["black"], "white": ["white"], "brown": ["brown", "tan"], "orange": ["orange"],
    "pink": ["pink"], "purple": ["purple", "violet*"], "gray": ["gray", "grey"],
    "silver": ["silver", "metal"],
}
SIZES = {"small": ["small", "little", "tiny*"], "large": ["large", "big", "huge", "giant"]}
# count classes: one, two, three, many
COUNTS = {1: ["a"], 2: ["two", "a pair of"], 3: ["three"], 4: ["several", "many", "a group of",
                                                                  "a bunch of", "some"]}
GARMENTS = ["shirt", "jacket", "hat", "coat", "dress", "suit"]

TEMPLATES_MAIN = [
    "{np} {be} {vp} {pl}",
    "{np} {vp} {pl}",
    "there {be} {np} {vp} {pl}",
    "{pl} {np} {be} {vp}",
    "{np} that {be} {vp} {pl}",
    "a photo of {np} {vp} {pl}",
    "a view of {np} {vp} {pl}",
    "an image of {np} {pl}",
    "a close up of {np} {vp} {pl}",
]
TEMPLATES_WITH_OTHER = [
    "{np} {vp} {pl} next to {s1}",
    "{np} {be} {vp} near {s1} {pl}",
    "{np} and {s1} {pl}",
    "{np} {vp} {pl} with {s1} nearby",
    "{np} with {s1} {vp} {pl}",
    "{np} {be} {vp} {pl} beside {s1}",
    "there {be} {np} and {s1} {pl}",
    "{pl} {np} {be} {vp} by {s1}",
]
TEMPLATES_WITH_TWO = [
    "{np} {vp} {pl} with {s1} and {s2}",
    "{np} and {s1} and {s2} {pl}",
    "{np} {be} {vp} {pl} near {s1} and {s2}",
]

ACTION_NAMES = list(ACTIONS)
PLACE_NAMES = list(PLACES)
COLOUR_NAMES = list(COLOURS)
SIZE_NAMES = list(SIZES)
