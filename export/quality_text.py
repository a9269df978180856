"""A fixed English passage (written for this project) for perplexity: about 300 tokens."""

PERPLEXITY_TEXT = (
    "The river that runs through the old market town has changed its course three times in recorded history. "
    "The first change came after a long winter, when ice dammed the northern bend and the spring flood cut a new "
    "channel across the meadows. Farmers lost a season of hay, but the mill downstream gained a steadier flow of water, "
    "and within ten years the town had two mills instead of one. The second change was the work of engineers. "
    "In the middle of the nineteenth century, a railway company needed a flat route into the valley, and it paid "
    "to straighten the river with stone walls and a deep cutting. Boats could no longer reach the upper wharves, "
    "so the warehouses there were turned into houses, a school and, later, a small museum. The third change is "
    "happening now, slowly. The walls built by the railway are crumbling, and each year the river takes back a few "
    "metres of the old bend. Some people in the town want the walls repaired, because the gardens along the bank "
    "are at risk. Others argue that the river should be left alone, since the restored wetland already shelters "
    "herons, otters and rare plants that had not been seen in the valley for a century. The town council has asked "
    "both groups to present their case at a public meeting next month. Whatever they decide, the museum plans a new "
    "exhibition that will show maps of all three courses side by side, so that visitors can see how a river, given "
    "enough time, rewrites the shape of the land and the lives of the people who depend on it."
)
