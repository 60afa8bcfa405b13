using System.Globalization;

namespace OpenVLA.Simulation.Tabletop;

/// <summary>
/// Our tabletop MJCF, written by us: a 7-DoF arm with Franka-Panda-like kinematics and capsule links, a two-finger parallel
/// gripper, a table, four coloured cubes, a plate and two flat targets, a fixed third-person camera and a wrist camera.
/// The arm follows a mocap body through a weld (Cartesian end-effector control, mujoco-headless.md §3); the plate and the
/// targets are mocap bodies too, so each episode can place them without changing the model.
/// World frame: table top at z = 0, robot base at the origin, +x away from the robot, +y to the robot's left. The
/// third-person camera faces the robot from the far side of the table, so image left is world -y.
/// </summary>
public static class TabletopScene
{
    public const double CubeHalfSize = 0.025;
    public const double PlateRadius = 0.075, PlateHalfHeight = 0.006;
    public const double TargetRadius = 0.045;
    public const double FingerOpen = 0.04;

    public static readonly string[] CubeColours = ["red", "green", "blue", "yellow"];
    public static readonly string[] TargetColours = ["purple", "orange"];

    public static string AgentCamera => "agentview";
    public static string WristCamera => "wrist";

    internal static readonly Dictionary<string, string> Rgba = new()
    {
        ["red"] = "0.85 0.1 0.1 1",
        ["green"] = "0.1 0.7 0.15 1",
        ["blue"] = "0.1 0.25 0.9 1",
        ["yellow"] = "0.95 0.85 0.1 1",
        ["purple"] = "0.6 0.2 0.8 1",
        ["orange"] = "1.0 0.5 0.0 1",
    };

    /// <summary>The arm's joint angles at the start of every episode: fingertips 26 cm above the table at x = 0.45, pointing down, in view of the camera.</summary>
    public static readonly double[] HomeJoints = [0, -0.2042, 0, -2.4834, 0, 2.2791, Math.PI / 4];

    /// <summary>MJCF text; the offscreen buffer equals the largest image we render, so no pixels are wasted.</summary>
    public static string Build(int imageSize)
    {
        string s = imageSize.ToString(CultureInfo.InvariantCulture);
        var cubes = string.Join("\n", CubeColours.Select(c => $"""
                <body name="cube_{c}" pos="0.5 0 0.02">
                  <freejoint name="cube_{c}"/>
                  <geom name="cube_{c}" type="box" size="{CubeHalfSize} {CubeHalfSize} {CubeHalfSize}" rgba="{Rgba[c]}" mass="0.04"
                        condim="4" friction="1.2 0.01 0.0002" priority="1"/>
                </body>
            """));
        var targets = string.Join("\n", TargetColours.Select(c => $"""
                <body name="target_{c}" mocap="true" pos="0.5 0 0.0005">
                  <geom name="target_{c}" type="cylinder" size="{TargetRadius} 0.0005" rgba="{Rgba[c]}" contype="0" conaffinity="0"/>
                </body>
            """));
        return $"""
            <mujoco model="tabletop">
              <compiler angle="radian" autolimits="true"/>
              <option timestep="0.002" cone="elliptic" impratio="5" integrator="Euler"/>
              <size nconmax="200" njmax="600"/>
              <visual>
                <global offwidth="{s}" offheight="{s}" fovy="45"/>
                <quality offsamples="0" shadowsize="512"/>
                <headlight ambient="0.45 0.45 0.45" diffuse="0.45 0.45 0.45" specular="0 0 0"/>
                <map znear="0.02"/>
              </visual>
              <default>
                <geom solref="0.01 1" solimp="0.95 0.99 0.001"/>
                <default class="link">
                  <geom type="capsule" contype="0" conaffinity="0" rgba="0.92 0.92 0.92 1" mass="0.15"/>
                  <joint damping="3" armature="0.05"/>
                </default>
              </default>
              <worldbody>
                <light name="sun" pos="0.5 0 1.5" dir="0 0 -1" directional="true" diffuse="0.5 0.5 0.5" specular="0 0 0"/>
                <geom name="floor" type="plane" pos="0 0 -0.75" size="3 3 0.1" rgba="0.25 0.25 0.28 1"/>
                <geom name="table" type="box" pos="0.4 0 -0.025" size="0.6 0.6 0.025" rgba="0.78 0.74 0.66 1" friction="0.6 0.005 0.0001"/>
                <camera name="agentview" pos="0.85 0 0.70" xyaxes="0 1 0 -0.894 0 0.447" fovy="46"/>

                <body name="link0" pos="0 0 0">
                  <geom class="link" type="cylinder" size="0.07 0.06" pos="0 0 0.06" rgba="0.3 0.3 0.32 1"/>
                  <body name="link1" pos="0 0 0.333">
                    <joint name="joint1" class="link" axis="0 0 1" range="-2.9 2.9"/>
                    <geom class="link" fromto="0 0 -0.2 0 0 0" size="0.055"/>
                    <body name="link2" quat="0.7071068 -0.7071068 0 0">
                      <joint name="joint2" class="link" axis="0 0 1" range="-1.76 1.76"/>
                      <geom class="link" fromto="0 0 0 0 -0.316 0" size="0.055"/>
                      <body name="link3" pos="0 -0.316 0" quat="0.7071068 0.7071068 0 0">
                        <joint name="joint3" class="link" axis="0 0 1" range="-2.9 2.9"/>
                        <geom class="link" fromto="0 0 0 0.0825 0 0" size="0.05"/>
                        <body name="link4" pos="0.0825 0 0" quat="0.7071068 0.7071068 0 0">
                          <joint name="joint4" class="link" axis="0 0 1" range="-3.07 -0.07"/>
                          <geom class="link" fromto="0 0 0 -0.0825 0.384 0" size="0.05"/>
                          <body name="link5" pos="-0.0825 0.384 0" quat="0.7071068 -0.7071068 0 0">
                            <joint name="joint5" class="link" axis="0 0 1" range="-2.9 2.9"/>
                            <geom class="link" fromto="0 0 -0.1 0 0 0" size="0.045"/>
                            <body name="link6" quat="0.7071068 0.7071068 0 0">
                              <joint name="joint6" class="link" axis="0 0 1" range="-0.0175 3.75"/>
                              <geom class="link" fromto="0 0 0 0.088 0 0" size="0.045"/>
                              <body name="link7" pos="0.088 0 0" quat="0.7071068 0.7071068 0 0">
                                <joint name="joint7" class="link" axis="0 0 1" range="-2.9 2.9"/>
                                <geom class="link" fromto="0 0 0 0 0 0.06" size="0.04" rgba="0.3 0.3 0.32 1"/>
                                <body name="hand" pos="0 0 0.107" quat="0.9238795 0 0 -0.3826834">
                                  <geom name="hand" type="box" size="0.025 0.09 0.025" pos="0 0 0.02" rgba="0.92 0.92 0.92 1" mass="0.3"/>
                                  <site name="tcp" pos="0 0 0.105" size="0.005" rgba="1 0 0 0"/>
                                  <camera name="wrist" pos="0.07 0 0.0" xyaxes="0 -1 0 -1 0 -0.35" fovy="70"/>
                                  <body name="left_finger" pos="0 0 0.0584">
                                    <joint name="finger_left" type="slide" axis="0 1 0" range="0 0.04" damping="2" armature="0.01"/>
                                    <geom name="finger_left" type="box" size="0.01 0.006 0.027" pos="0 0.006 0.027" rgba="0.35 0.35 0.38 1"
                                          mass="0.02" condim="4" friction="1.5 0.01 0.0002" priority="2"/>
                                  </body>
                                  <body name="right_finger" pos="0 0 0.0584">
                                    <joint name="finger_right" type="slide" axis="0 -1 0" range="0 0.04" damping="2" armature="0.01"/>
                                    <geom name="finger_right" type="box" size="0.01 0.006 0.027" pos="0 -0.006 0.027" rgba="0.35 0.35 0.38 1"
                                          mass="0.02" condim="4" friction="1.5 0.01 0.0002" priority="2"/>
                                  </body>
                                </body>
                              </body>
                            </body>
                          </body>
                        </body>
                      </body>
                    </body>
                  </body>
                </body>

                <body name="hand_target" mocap="true" pos="0.4 0 0.3"/>
                <body name="plate" mocap="true" pos="0.5 0 {PlateHalfHeight}">
                  <geom name="plate" type="cylinder" size="{PlateRadius} {PlateHalfHeight}" rgba="0.97 0.97 0.97 1" friction="0.8 0.005 0.0001"/>
                  <geom name="plate_rim" type="cylinder" size="{PlateRadius + 0.004} {PlateHalfHeight * 0.6}" rgba="0.55 0.55 0.6 1"
                        contype="0" conaffinity="0"/>
                </body>
            {targets}
            {cubes}
              </worldbody>
              <contact>
                <exclude body1="left_finger" body2="right_finger"/>
              </contact>
              <equality>
                <weld name="hand_weld" body1="hand_target" body2="hand" solref="0.01 1" solimp="0.95 0.99 0.001"/>
              </equality>
              <actuator>
                <position name="finger_left" joint="finger_left" kp="300" ctrlrange="0 0.04" forcerange="-15 15"/>
                <position name="finger_right" joint="finger_right" kp="300" ctrlrange="0 0.04" forcerange="-15 15"/>
              </actuator>
            </mujoco>
            """;
    }
}
