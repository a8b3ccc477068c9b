"""What a label mask is: one class index per pixel, `IGNORE_INDEX` where a pixel counts nowhere
(void, borders, padding). Shared by the data (which pads and checks masks), the losses and the
metrics, none of which imports another."""

IGNORE_INDEX = 255  # Cityscapes' and VOC's void label
