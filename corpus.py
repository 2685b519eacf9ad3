"""The tiny configuration's text corpus: the English its offline BPE tokenizer is trained on
(tokenizer.build_tiny_tokenizer).

Prompts and task instructions over colours x objects, everyday words, arm names, digits and
punctuation, so the built vocabulary (about 1600 BPE pieces) holds whole-word pieces for what the
prompts and pose text say. The vocabulary is a function of this text: any edit here changes the
token ids, and every tiny checkpoint (and the tiny VLM in the data cache) stops matching.
"""

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "gray",
           "brown", "cyan", "magenta", "silver", "golden", "dark", "light", "wooden", "metal", "plastic"]
OBJECTS = ["mug", "cup", "bowl", "plate", "cube", "block", "box", "bottle", "can", "ball", "apple",
           "banana", "orange", "lemon", "book", "phone", "laptop", "keyboard", "mouse", "chair", "table",
           "sofa", "bed", "lamp", "shelf", "cabinet", "drawer", "door", "window", "shoe", "hammer",
           "screwdriver", "spoon", "fork", "knife", "pan", "pot", "kettle", "toy", "car", "bin", "basket",
           "tray", "towel", "sponge", "marker", "pen", "scissors", "tape", "camera", "bag", "cylinder"]
TASK_TEMPLATES = ["pick up the {a} and place it in the {b}", "put the {a} on the {b}",
                  "stack the {a} on top of the {b}", "push the {a} to the left of the {b}",
                  "move the {a} next to the {b}", "hand over the {a} with both arms",
                  "lift the {a} with the left arm", "grasp the {a} with the right arm",
                  "open the {b} and put the {a} inside", "place the {a} behind the {b}",
                  "detect the {a}", "detect the {b}", "where is the {a}?", "the {a} is in front of the {b}."]


# Everyday words so the BPE vocabulary grows to a few thousand whole-word pieces.
WORDS = """a about above across after again against all almost along also always among an and
another any anything around as at away back backward be because before behind below beneath beside
between both bottom but by can carefully center clockwise close closer come corner could counter
down during each edge either empty every far farther few first for forward from front full gently
half have here high hold how if in inside into is it its just keep large last left less level like
little long low many middle more most move near nearest next no not now of off on once one only onto
open or other out outside over own pair part past place point position quickly rather right round
same second several shape short side since slowly small so some still such than that the their them
then there these they thing third this those through tight tilt to together too top toward turn two
under until up upon upright upside use very vertical via was way what when where which while who
why will with within without would yes yet you adjust align arrange assemble attach beat blend
bring brush carry catch check clean clear close collect connect cover cut drag draw drop dump empty
fetch fill find flip fold grab grasp hang hit insert inspect lay lean lift load locate lock look
lower mix mount nudge open pack paint pass peel pick place plug pour press pull push put raise
reach release remove reorient rest return rinse roll rotate scoop screw seal separate serve set
shake shift shut slide sort spin spread squeeze stack stand stir store swap sweep swing take tap
throw tidy touch transfer tuck turn twist unlock unplug unscrew unstack wipe wrap apple avocado
backpack badminton banana barrel basin bathtub battery bell bench bicycle binder blanket blender
board bolt bookshelf bottle bread brick bucket burger butter button cabinet cake calculator can
candle cap carrot carton chair cheese cherry chip chocolate clamp clock cloth coaster coffee
comb computer cone container cookie cooler corn counter crate cream cup curtain cushion desk dice
dish dishwasher doll donut dryer dumbbell egg eraser fan faucet figure file flashlight flask flower
folder fridge fruit funnel garlic glass glove glue grape grapefruit guitar hammer handle hat
headphone helmet holder hook jar jug key kiwi ladder lamp lid lighter lock magazine mango mat
microwave milk mirror monitor mop mug mushroom napkin needle nut onion oven pad pail paper peach
pear pepper piano picture pillow pineapple pipe pitcher pizza plant plate pliers plug pot potato
printer pumpkin puzzle rack radio remote ring rope ruler salt sandwich sauce saucer scale shampoo
sheet shoe sink skateboard slipper soap sock soda speaker sphere stapler statue stool stove
strawberry sugar suitcase switch teapot telephone television tennis tissue toaster toilet tomato
toothbrush toothpaste trash tripod truck tube umbrella vase wallet washer watch watermelon whisk
wrench yogurt beige bright cobalt crimson cyan gold indigo ivory khaki lavender lime maroon navy
olive peach rose ruby salmon scarlet silver tan teal turquoise violet big tiny huge narrow wide
thick thin tall flat round square rectangular triangular cylindrical spherical soft hard heavy
light shiny matte striped dotted transparent wooden metallic ceramic glass paper rubber fabric
leather cardboard stone""".split()


def tiny_corpus():
    """A small built-in English corpus (prompts, task instructions, colours, objects, arms)."""
    things = [f"{c} {o}" for c in COLOURS for o in OBJECTS]
    lines = [t.format(a=things[(7 * i) % len(things)], b=things[(13 * i + 5) % len(things)])
             for i in range(len(things)) for t in TASK_TEMPLATES]
    lines += [" ".join(WORDS[i:i + 12]) for i in range(0, len(WORDS), 12)]
    lines += [f"detect the {a} {b}" for a, b in zip(WORDS, WORDS[7:] + WORDS[:7])]
    lines += [f"{arm} arm {k}" for arm in ("left", "right") for k in range(10)]
    lines += ["Robot manipulation on a tabletop with two arms, a head camera and two wrist cameras.",
              "Numbers: 0 1 2 3 4 5 6 7 8 9 10 20 50 100. Punctuation: , . ; : ! ? ' \" ( ) - _ /"]
    return lines
