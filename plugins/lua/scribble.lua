-- A scribble hint for scribble ControlNets (control_v11p_sd15_scribble, t2iadapter_sketch): the
-- image's Canny edges thickened into strokes, white on black. A pattern for other hint types: compose
-- built-in nodes with diffloom.call (and tensor arithmetic where needed); nothing is downloaded.
diffloom.node {
  name = "ScribbleFromEdges",
  category = "image/preprocessors",
  description = "Canny edges dilated into strokes `thickness` pixels wide, nearby strokes joined (white on black).",
  inputs = {
    { "image", "IMAGE" },
    { "low_threshold", "FLOAT", default = 0.2, min = 0.01, max = 0.99 },
    { "high_threshold", "FLOAT", default = 0.5, min = 0.01, max = 0.99 },
    { "thickness", "INT", default = 5, min = 3, max = 64 },
  },
  outputs = { { "IMAGE", "IMAGE" } },
  execute = function(a)
    local edges = diffloom.call("Canny", {
      image = a.image, low_threshold = a.low_threshold, high_threshold = a.high_threshold,
    })
    local strokes = diffloom.call("Morphology", { image = edges, operation = "dilate", kernel_size = a.thickness })
    -- Closing joins strokes that nearly touch, as a hand-drawn scribble would.
    strokes = diffloom.call("Morphology", { image = strokes, operation = "close", kernel_size = a.thickness })
    return strokes
  end,
}
