"""Offscreen rendering of the built-in tabletop world (sim.py) and its camera conventions (method.md §2).

`gl_context` finds a working OpenGL backend (MUJOCO_GL first, OSMesa after EGL); `Views` renders RGB,
metric depth and per-geom segmentation from a model's cameras. K uses OpenCV pixel coordinates (pixel
centres at integers, so c = ((W-1)/2, (H-1)/2)); `cam2world_cv` is a 4x4 camera->world pose in OpenCV
axes (x right, y down, z forward), converted from MuJoCo's cameras, which look down -z with y up.
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless GPU/software rendering; must precede import

import importlib
import sys

import mujoco
import numpy as np


_GL_CLASS = None


def gl_context(width, height, backends=None):
    """An OpenGL context for offscreen rendering, trying MUJOCO_GL first, then OSMesa after EGL.

    Raises RuntimeError naming every MUJOCO_GL value tried when none of them works.
    """
    global _GL_CLASS
    if _GL_CLASS is not None and backends is None:
        return _GL_CLASS(width, height)
    first = os.environ.get("MUJOCO_GL", "egl").lower()
    backends = backends or ([first, "osmesa"] if first == "egl" else [first])
    errors = []
    for name in backends:
        try:
            if name not in ("egl", "osmesa", "glfw"):
                raise ValueError(f"unsupported MUJOCO_GL value {name!r} (use egl or osmesa)")
            if os.environ.get("PYOPENGL_PLATFORM", name) != name:  # a failed earlier backend
                os.environ["PYOPENGL_PLATFORM"] = name
                for mod in [m for m in sys.modules if m.startswith("OpenGL")]:
                    del sys.modules[mod]
            cls = importlib.import_module(f"mujoco.{name}").GLContext
            ctx = cls(width, height)
            ctx.make_current()
        except Exception as e:  # noqa: BLE001 - every backend failure is reported below
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        _GL_CLASS = cls
        return ctx
    raise RuntimeError("no MuJoCo rendering backend works; MUJOCO_GL values tried: "
                       + ", ".join(backends) + ". Errors: " + " | ".join(errors)
                       + ". Install EGL (libegl1) or OSMesa (libosmesa6), or set MUJOCO_GL.")


class Views:
    """Renders RGB, metric depth and per-geom segmentation from the model's cameras."""

    def __init__(self, model, size, shadows, ctx):
        self.size, self.model, self.ctx = size, model, ctx
        ctx.make_current()
        self.con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_100)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self.con)
        self.con.readDepthMap = mujoco.mjtDepthMap.mjDEPTH_ZEROFAR
        self.scene = mujoco.MjvScene(model, maxgeom=500)
        self.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = shadows
        self.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self.opt, self.cam = mujoco.MjvOption(), mujoco.MjvCamera()
        self.cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self.rect = mujoco.MjrRect(0, 0, size, size)
        near, far = model.vis.map.znear * model.stat.extent, model.vis.map.zfar * model.stat.extent
        self.far = far
        # reversed-Z depth buffer b in [0, 1] -> metric z = d / (b + c) (glFrustum, float32 planes)
        n32, f32 = np.float32(near), np.float32(far)
        self.c = -0.5 * (-(f32 + n32) / (f32 - n32)) - 0.5
        self.d = -0.5 * (-(2 * f32 * n32) / (f32 - n32))

    def current(self):
        """Make this world's GL context current and bind its offscreen buffer again before a render:
        another renderer in the process (robosuite's, i.e. LIBERO's) switches both, and with only the
        context restored the world renders black."""
        self.ctx.make_current()
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self.con)

    def update(self, data, cam_id):
        self.cam.fixedcamid = cam_id
        mujoco.mjv_updateScene(self.model, data, self.opt, None, self.cam,
                               mujoco.mjtCatBit.mjCAT_ALL, self.scene)

    def rgbd(self):
        s = self.size
        rgb, buf = np.empty((s, s, 3), np.uint8), np.empty((s, s), np.float32)
        self.current()
        mujoco.mjr_render(self.rect, self.scene, self.con)
        mujoco.mjr_readPixels(rgb, buf, self.rect, self.con)
        depth = (self.d / (buf.astype(np.float64) + self.c)).astype(np.float32)
        depth[depth >= 0.99 * self.far] = 0.0  # nothing hit: invalid
        return np.flipud(rgb).copy(), np.flipud(depth).copy()

    def geom_ids(self, keep=None):
        """(H, W) int32 MuJoCo geom id per pixel, -1 for background; `keep` hides other geoms."""
        s, scn = self.size, self.scene
        objid = np.full(scn.ngeom + 1, -1, np.int32)
        for i in range(scn.ngeom):
            g = scn.geoms[i]
            if g.objtype == mujoco.mjtObj.mjOBJ_GEOM and g.segid >= 0:
                objid[g.segid + 1] = g.objid
                if keep is not None and g.objid not in keep:
                    g.pos[2] -= 1000.0  # move out of the frustum for an unoccluded render
        flags = scn.flags
        flags[mujoco.mjtRndFlag.mjRND_SEGMENT] = flags[mujoco.mjtRndFlag.mjRND_IDCOLOR] = True
        px = np.empty((s, s, 3), np.uint8)
        self.current()
        mujoco.mjr_render(self.rect, scn, self.con)
        mujoco.mjr_readPixels(px, None, self.rect, self.con)
        flags[mujoco.mjtRndFlag.mjRND_SEGMENT] = flags[mujoco.mjtRndFlag.mjRND_IDCOLOR] = False
        px = px.astype(np.int64)
        seg = px[..., 0] + 256 * px[..., 1] + 65536 * px[..., 2]
        return np.flipud(objid[np.minimum(seg, scn.ngeom)]).copy()

    def close(self):
        self.ctx.make_current()
        self.con.free()


def intrinsics(fovy_deg, size):
    f = 0.5 * size / np.tan(np.deg2rad(fovy_deg) / 2)
    c = (size - 1) / 2.0
    return np.array([[f, 0, c], [0, f, c], [0, 0, 1.0]])


MJ_TO_CV = np.diag([1.0, -1.0, -1.0])  # MuJoCo camera axes (y up, looks down -z) <-> OpenCV; own inverse


def cam2world_cv(data, cam_id):
    """4x4 camera->world in OpenCV axes: MuJoCo's camera y (up) and z (backwards) are flipped."""
    T = np.eye(4)
    T[:3, :3] = data.cam_xmat[cam_id].reshape(3, 3) @ MJ_TO_CV
    T[:3, 3] = data.cam_xpos[cam_id]
    return T
