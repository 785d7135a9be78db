import Foundation

/// Replays files of a corpus (seeds and minimised findings) through a
/// target: what `xenbackd-fuzz TARGET FILE...` and FuzzReplayTests do.
public enum FuzzCorpus {
    /// Every regular file at or below each path (a file is itself), sorted;
    /// hidden files (.gitkeep) are skipped.
    public static func files(at paths: [String]) -> [String] {
        var result: [String] = []
        let manager = FileManager.default
        for path in paths {
            var isDirectory: ObjCBool = false
            guard manager.fileExists(atPath: path, isDirectory: &isDirectory) else { continue }
            guard isDirectory.boolValue else {
                result.append(path)
                continue
            }
            let enumerator = manager.enumerator(atPath: path)
            while let relative = enumerator?.nextObject() as? String {
                let full = path + "/" + relative
                let name = (relative as NSString).lastPathComponent
                var isDir: ObjCBool = false
                if !name.hasPrefix("."), manager.fileExists(atPath: full, isDirectory: &isDir), !isDir.boolValue {
                    result.append(full)
                }
            }
        }
        return result.sorted()
    }

    /// The target's findings for the file's bytes; nil if it cannot be read.
    public static func replay(_ target: any FuzzTarget.Type, file: String) -> [String]? {
        guard let data = FileManager.default.contents(atPath: file) else { return nil }
        return data.withUnsafeBytes { target.run($0) }
    }
}
