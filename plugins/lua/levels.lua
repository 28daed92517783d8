-- Levels and saturation for images: black and white points, gamma, saturation.
-- All arithmetic runs on whole tensors in libtorch; no pixel loops in Lua.
diffloom.node {
  name = "ColorLevels",
  category = "image/adjust",
  description = "Remaps black/white points, applies gamma, then scales saturation (1 = unchanged).",
  inputs = {
    { "image", "IMAGE" },
    { "black_point", "FLOAT", default = 0.0, min = 0.0, max = 1.0 },
    { "white_point", "FLOAT", default = 1.0, min = 0.0, max = 1.0 },
    { "gamma", "FLOAT", default = 1.0, min = 0.05, max = 10.0 },
    { "saturation", "FLOAT", default = 1.0, min = 0.0, max = 4.0 },
  },
  outputs = { { "IMAGE", "IMAGE" } },
  execute = function(a)
    if a.white_point <= a.black_point then
      error("white_point must be above black_point", 0)
    end
    local x = ((a.image - a.black_point) / (a.white_point - a.black_point)):clamp(0, 1)
    if a.gamma ~= 1.0 then
      x = x:pow(1.0 / a.gamma)
    end
    if a.saturation ~= 1.0 then
      -- Away from (or towards) the grayscale version of the image.
      x = x:gray():lerp(x, a.saturation):clamp(0, 1)
    end
    return x
  end,
}
