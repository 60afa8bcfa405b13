using Parquet;
using Parquet.Schema;

namespace OpenVLA.FineTune.Data;

/// <summary>
/// Reads whole top-level columns of one parquet file into per-row arrays, for the column shapes LeRobot (Hugging Face
/// datasets / pyarrow) writes: scalars, lists of numbers (<c>list&lt;element: float&gt;</c>), and image structs
/// <c>{bytes: binary, path: string}</c>. Only the requested columns are decoded, so reading actions skips the image bytes.
/// </summary>
internal sealed class ParquetColumns
{
    private readonly Dictionary<string, object> _columns = new(StringComparer.Ordinal);

    public string Path { get; }
    public int RowCount { get; private set; }
    public IReadOnlyCollection<string> AvailableColumns { get; private set; } = [];

    private ParquetColumns(string path) => Path = path;

    /// <param name="optional">Columns read only when the file has them (see <see cref="Has"/>).</param>
    public static ParquetColumns Read(string path, IEnumerable<string> columns, IEnumerable<string>? optional = null) =>
        ReadAsync(path, columns, optional ?? []).GetAwaiter().GetResult();

    private static async Task<ParquetColumns> ReadAsync(string path, IEnumerable<string> required, IEnumerable<string> optional)
    {
        if (!File.Exists(path)) throw new DatasetException($"parquet file not found: {path}");
        var result = new ParquetColumns(path);
        ParquetReader reader;
        try { reader = await ParquetReader.CreateAsync(path); }
        catch (Exception e) when (e is not DatasetException) { throw new DatasetException($"{path} is not a readable parquet file: {e.Message}", e); }
        await using (reader)
        {
            result.AvailableColumns = reader.Schema.Fields.Select(f => f.Name).ToArray();
            long rows = 0;
            for (int g = 0; g < reader.RowGroupCount; g++) rows += reader.OpenRowGroupReader(g).RowCount;
            result.RowCount = checked((int)rows);
            var present = reader.Schema.Fields.Select(f => f.Name).ToHashSet(StringComparer.Ordinal);
            foreach (string name in required.Concat(optional.Where(present.Contains)).Distinct())
            {
                var field = reader.Schema.Fields.FirstOrDefault(f => f.Name == name)
                    ?? throw new DatasetException($"{path} has no column '{name}' (columns: {string.Join(", ", result.AvailableColumns)})");
                try { result._columns[name] = await ReadColumnAsync(reader, field, result.RowCount, path); }
                catch (Exception e) when (e is not DatasetException)
                {
                    throw new DatasetException($"{path}: cannot read column '{name}': {e.Message}", e);
                }
            }
        }
        return result;
    }

    private static async Task<object> ReadColumnAsync(ParquetReader reader, Field field, int rows, string path) =>
        field switch
        {
            ListField list when list.Item is DataField leaf => await ReadNumberListsAsync(reader, leaf, rows, path),
            StructField s when s.Fields.OfType<DataField>().FirstOrDefault(f => f.Name == "bytes") is { } bytes =>
                await ReadBinaryAsync(reader, bytes, rows),
            DataField d when d.ClrType == typeof(string) || d.ClrType == typeof(ReadOnlyMemory<char>) => await ReadStringsAsync(reader, d, rows),
            DataField d when d.ClrType == typeof(byte[]) || d.ClrType == typeof(ReadOnlyMemory<byte>) => await ReadBinaryAsync(reader, d, rows),
            DataField d => await ReadNumbersAsync(reader, d, rows, path),
            _ => throw new DatasetException($"{path}: column '{field.Name}' has an unsupported parquet type ({field.SchemaType})"),
        };

    public bool Has(string column) => _columns.ContainsKey(column);
    public bool IsNumberList(string column) => _columns.TryGetValue(column, out var o) && o is float[][];

    public double[] Numbers(string column) => Get<double[]>(column, "a number column");
    public float[][] NumberLists(string column) => Get<float[][]>(column, "a list of numbers");
    public byte[]?[] Binary(string column) => Get<byte[]?[]>(column, "an image struct {bytes, path} or binary column");
    public string?[] Strings(string column) => Get<string?[]>(column, "a string column");

    private T Get<T>(string column, string expected) where T : class =>
        _columns.TryGetValue(column, out var o) ? o as T ?? throw new DatasetException($"{Path}: column '{column}' is not {expected}")
            : throw new InvalidOperationException($"column '{column}' was not requested");

    private static async Task<double[]> ReadNumbersAsync(ParquetReader reader, DataField field, int rows, string path)
    {
        var result = new double[rows];
        int row = 0;
        for (int g = 0; g < reader.RowGroupCount; g++)
        {
            var rg = reader.OpenRowGroupReader(g);
            var (values, defs, _) = await ReadLeafAsync(rg, field);
            int v = 0;
            for (int i = 0; i < defs.Length; i++)
            {
                if (defs[i] != field.MaxDefinitionLevel) throw new DatasetException($"{path}: column '{field.Name}' has a null in row {row}");
                result[row++] = values[v++];
            }
        }
        return result;
    }

    private static async Task<float[][]> ReadNumberListsAsync(ParquetReader reader, DataField leaf, int rows, string path)
    {
        var result = new float[rows][];
        int row = -1;
        var current = new List<float>();
        for (int g = 0; g < reader.RowGroupCount; g++)
        {
            var rg = reader.OpenRowGroupReader(g);
            var (values, defs, reps) = await ReadLeafAsync(rg, leaf);
            int v = 0;
            for (int i = 0; i < defs.Length; i++)
            {
                if (reps[i] == 0)
                {
                    if (row >= 0) result[row] = current.ToArray();
                    current.Clear();
                    row++;
                }
                if (defs[i] == leaf.MaxDefinitionLevel) current.Add((float)values[v++]);
            }
        }
        if (row >= 0) result[row] = current.ToArray();
        if (row != rows - 1) throw new DatasetException($"{path}: list column '{leaf.Path}' has {row + 1} rows, expected {rows}");
        return result;
    }

    /// <summary>Dense non-null values (as doubles) and the definition and repetition level of every entry.</summary>
    private static async Task<(double[] Values, int[] Defs, int[] Reps)> ReadLeafAsync(ParquetRowGroupReader rg, DataField field)
    {
        int n = checked((int)(rg.GetMetadata(field)?.MetaData?.NumValues ?? rg.RowCount));
        var defs = new int[n];
        var reps = new int[n];
        double[] values;
        if (field.ClrType == typeof(float)) values = Widen(await Raw<float>(rg, field, defs, reps), x => x);
        else if (field.ClrType == typeof(double)) values = await Raw<double>(rg, field, defs, reps);
        else if (field.ClrType == typeof(long)) values = Widen(await Raw<long>(rg, field, defs, reps), x => x);
        else if (field.ClrType == typeof(int)) values = Widen(await Raw<int>(rg, field, defs, reps), x => x);
        else if (field.ClrType == typeof(short)) values = Widen(await Raw<short>(rg, field, defs, reps), x => x);
        else if (field.ClrType == typeof(byte)) values = Widen(await Raw<byte>(rg, field, defs, reps), x => x);
        else if (field.ClrType == typeof(bool)) values = Widen(await Raw<bool>(rg, field, defs, reps), x => x ? 1 : 0);
        else throw new DatasetException($"column '{field.Path}' has type {field.ClrType.Name}, expected numbers");
        // Required (non-nullable, non-repeated) columns have no levels: every entry is a value.
        if (field.MaxDefinitionLevel == 0) Array.Fill(defs, 0);
        return (values, defs, reps);
    }

    private static async Task<T[]> Raw<T>(ParquetRowGroupReader rg, DataField field, int[] defs, int[] reps) where T : struct
    {
        var values = new T[defs.Length];
        await rg.ReadRawAsync<T>(field, values, defs, reps);
        return values;
    }

    private static double[] Widen<T>(T[] values, Func<T, double> f)
    {
        var r = new double[values.Length];
        for (int i = 0; i < r.Length; i++) r[i] = f(values[i]);
        return r;
    }

    private static async Task<byte[]?[]> ReadBinaryAsync(ParquetReader reader, DataField field, int rows)
    {
        var result = new byte[]?[rows];
        int row = 0;
        for (int g = 0; g < reader.RowGroupCount; g++)
        {
            var rg = reader.OpenRowGroupReader(g);
            var part = new byte[]?[rg.RowCount];
            await rg.ReadAsync(field, part.AsMemory());
            part.CopyTo(result, row);
            row += part.Length;
        }
        return result;
    }

    private static async Task<string?[]> ReadStringsAsync(ParquetReader reader, DataField field, int rows)
    {
        var result = new string?[rows];
        int row = 0;
        for (int g = 0; g < reader.RowGroupCount; g++)
        {
            var rg = reader.OpenRowGroupReader(g);
            var part = new string?[rg.RowCount];
            await rg.ReadAsync(field, part.AsMemory()!);
            part.CopyTo(result, row);
            row += part.Length;
        }
        return result;
    }
}
