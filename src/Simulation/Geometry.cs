namespace OpenVLA.Simulation;

/// <summary>A 3-vector in metres (world frame unless said otherwise).</summary>
public readonly record struct Vec3(double X, double Y, double Z)
{
    public static Vec3 operator +(Vec3 a, Vec3 b) => new(a.X + b.X, a.Y + b.Y, a.Z + b.Z);
    public static Vec3 operator -(Vec3 a, Vec3 b) => new(a.X - b.X, a.Y - b.Y, a.Z - b.Z);
    public static Vec3 operator *(Vec3 a, double s) => new(a.X * s, a.Y * s, a.Z * s);
    public double Length => Math.Sqrt(X * X + Y * Y + Z * Z);
    public double HorizontalDistance(Vec3 other) => Math.Sqrt((X - other.X) * (X - other.X) + (Y - other.Y) * (Y - other.Y));
}

/// <summary>A unit quaternion (w, x, y, z), MuJoCo's order.</summary>
public readonly record struct Quat(double W, double X, double Y, double Z)
{
    public static Quat Identity => new(1, 0, 0, 0);

    public static Quat operator *(Quat a, Quat b) => new(
        a.W * b.W - a.X * b.X - a.Y * b.Y - a.Z * b.Z,
        a.W * b.X + a.X * b.W + a.Y * b.Z - a.Z * b.Y,
        a.W * b.Y - a.X * b.Z + a.Y * b.W + a.Z * b.X,
        a.W * b.Z + a.X * b.Y - a.Y * b.X + a.Z * b.W);

    public Quat Conjugate => new(W, -X, -Y, -Z);

    public Quat Normalized()
    {
        double n = Math.Sqrt(W * W + X * X + Y * Y + Z * Z);
        return new Quat(W / n, X / n, Y / n, Z / n);
    }

    public static Quat FromAxisAngle(Vec3 axis, double angle)
    {
        double s = Math.Sin(angle / 2), len = axis.Length;
        if (len < 1e-12) return Identity;
        return new Quat(Math.Cos(angle / 2), axis.X / len * s, axis.Y / len * s, axis.Z / len * s);
    }

    /// <summary>Rotation by the vector <paramref name="rotationVector"/> (axis * angle, radians).</summary>
    public static Quat FromRotationVector(Vec3 rotationVector) => FromAxisAngle(rotationVector, rotationVector.Length);

    public static Quat FromYaw(double yaw) => new(Math.Cos(yaw / 2), 0, 0, Math.Sin(yaw / 2));

    /// <summary>Extrinsic x-y-z (roll, pitch, yaw) angles, radians.</summary>
    public Vec3 ToEuler()
    {
        double roll = Math.Atan2(2 * (W * X + Y * Z), 1 - 2 * (X * X + Y * Y));
        double sinp = Math.Clamp(2 * (W * Y - Z * X), -1, 1);
        double pitch = Math.Asin(sinp);
        double yaw = Math.Atan2(2 * (W * Z + X * Y), 1 - 2 * (Y * Y + Z * Z));
        return new Vec3(roll, pitch, yaw);
    }

    public static Quat FromEuler(double roll, double pitch, double yaw) =>
        FromAxisAngle(new Vec3(0, 0, 1), yaw) * FromAxisAngle(new Vec3(0, 1, 0), pitch) * FromAxisAngle(new Vec3(1, 0, 0), roll);

    /// <summary>Angle of this rotation about the world z axis of its x axis (yaw of a mostly upright body).</summary>
    public double Yaw => Math.Atan2(2 * (W * Z + X * Y), 1 - 2 * (Y * Y + Z * Z));

    /// <summary>The body's local z axis expressed in the world frame.</summary>
    public Vec3 ZAxis => new(2 * (X * Z + W * Y), 2 * (Y * Z - W * X), 1 - 2 * (X * X + Y * Y));
}
