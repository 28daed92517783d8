-- A mask of the pixels near a colour (e.g. a green screen, or a flat colour painted over what to
-- inpaint), with a preview image of the mask.
diffloom.node {
  name = "MaskFromColor",
  category = "mask",
  description = "1 where every channel is within `threshold` of the colour (0..255 scale), else 0.",
  inputs = {
    { "image", "IMAGE" },
    { "red", "INT", default = 0, min = 0, max = 255 },
    { "green", "INT", default = 255, min = 0, max = 255 },
    { "blue", "INT", default = 0, min = 0, max = 255 },
    { "threshold", "INT", default = 16, min = 0, max = 255 },
  },
  outputs = { { "MASK", "MASK" }, { "IMAGE", "IMAGE" } },
  execute = function(a)
    local offset = { -a.red / 255, -a.green / 255, -a.blue / 255 }
    -- The largest per-channel distance to the colour, per pixel.
    local distance = a.image:channels({ 1, 1, 1 }, offset):abs():channel_max()
    local mask = distance:le(a.threshold / 255 + 1e-6)
    return mask, mask:to_image()
  end,
}
